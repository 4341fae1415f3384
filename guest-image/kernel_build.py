"""Builds the guest kernel from Debian's linux-source-6.1: tinyconfig + kernel/forkvm.config.

The result (bzImage for QEMU, vmlinux for vmcore's loader, and the final .config) lands in the
cache under kind "kernel"; a rebuild happens only when the source package, the fragment, this
script or the compiler changes.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vmcore.engine import ProgressCallback

from . import cache

SOURCE_PACKAGE = "linux-source-6.1"
SOURCE_TARBALL = Path("/usr/src/linux-source-6.1.tar.xz")
FRAGMENT = Path(__file__).parent / "kernel" / "forkvm.config"

# Roughly how many "CC" lines `make bzImage` prints for this config; only scales the progress
# bar (it is capped below 100% until make finishes), so it need not be exact.
_EXPECTED_COMPILE_STEPS = 800

# Fixed build metadata so that the same inputs give the same kernel banner.
_REPRODUCIBLE_ENV = {
    "KBUILD_BUILD_TIMESTAMP": "1970-01-01",
    "KBUILD_BUILD_USER": "forkvm",
    "KBUILD_BUILD_HOST": "forkvm",
}


class KernelBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelArtifacts:
    bzimage: Path
    vmlinux: Path
    config: Path


def kernel_inputs_hash() -> str:
    """Keyed by package version and tarball size+mtime: hashing 139 MB of source is too slow."""
    stat = SOURCE_TARBALL.stat()
    return cache.digest(
        [
            SOURCE_PACKAGE,
            cache.dpkg_version(SOURCE_PACKAGE),
            str(stat.st_size),
            str(stat.st_mtime_ns),
            _compiler_version(),
            *cache.file_digests([FRAGMENT, Path(__file__)], relative_to=Path(__file__).parent),
        ]
    )


def build_kernel(progress: ProgressCallback) -> KernelArtifacts:
    key = kernel_inputs_hash()
    entry = cache.lookup("kernel", key)
    if entry is None:
        if not SOURCE_TARBALL.exists():
            raise KernelBuildError(f"{SOURCE_TARBALL} is missing: apt-get install {SOURCE_PACKAGE}")
        entry = cache.build_entry("kernel", key, lambda out: _build_into(out, progress))
    return KernelArtifacts(entry / "bzImage", entry / "vmlinux", entry / "config")


def _build_into(out: Path, progress: ProgressCallback) -> None:
    with tempfile.TemporaryDirectory(prefix="forkvm-kernel-") as workdir:
        source = _extract(Path(workdir), progress)
        progress("kernel: configure (tinyconfig + forkvm.config)", None)
        _make(source, "tinyconfig")
        _run([str(source / "scripts/kconfig/merge_config.sh"), "-m", ".config", str(FRAGMENT)], source)
        _make(source, "olddefconfig")
        _verify_config(source / ".config")
        _compile(source, progress)
        shutil.copy2(source / "arch/x86/boot/bzImage", out / "bzImage")
        shutil.copy2(source / "vmlinux", out / "vmlinux")
        shutil.copy2(source / ".config", out / "config")


def _extract(workdir: Path, progress: ProgressCallback) -> Path:
    """Feed the tarball to tar ourselves so the bytes read give a real progress fraction."""
    stage = f"kernel: extract {SOURCE_TARBALL.name}"
    total = SOURCE_TARBALL.stat().st_size
    tar = subprocess.Popen(["tar", "-xJ", "-C", str(workdir)], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    assert tar.stdin is not None and tar.stderr is not None
    done = 0
    with SOURCE_TARBALL.open("rb") as tarball:
        while chunk := tarball.read(1 << 20):
            tar.stdin.write(chunk)
            done += len(chunk)
            progress(stage, done / total)
    tar.stdin.close()
    if tar.wait() != 0:
        raise KernelBuildError(f"extracting {SOURCE_TARBALL} failed: {tar.stderr.read().decode()}")
    roots = [p for p in workdir.iterdir() if p.is_dir()]
    if len(roots) != 1:
        raise KernelBuildError(f"expected one source tree in {SOURCE_TARBALL}, found {roots}")
    return roots[0]


def _verify_config(config: Path) -> None:
    """Kconfig silently drops options whose dependencies are unmet; refuse such a kernel."""
    final: dict[str, str] = {}
    for line in config.read_text().splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)", line):
            final[m[1]] = m[2]
    wrong = []
    for line in FRAGMENT.read_text().splitlines():
        if m := re.match(r"(CONFIG_\w+)=(.*)", line):
            if final.get(m[1]) != m[2]:
                wrong.append(f"{line}  (got {final.get(m[1], 'unset')})")
        elif (m := re.match(r"# (CONFIG_\w+) is not set", line)) and m[1] in final:
            wrong.append(f"{line}  (got {m[1]}={final[m[1]]})")
    if wrong:
        raise KernelBuildError("kernel config options did not stick:\n  " + "\n  ".join(wrong))


def _compile(source: Path, progress: ProgressCallback) -> None:
    stage = "kernel: compile bzImage"
    progress(stage, 0.0)
    cmd = ["make", f"-j{os.cpu_count() or 1}", "bzImage"]
    proc = subprocess.Popen(
        cmd, cwd=source, env=_make_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=40)
    compiled = 0
    for line in proc.stdout:
        tail.append(line)
        if line.startswith("  CC "):
            compiled += 1
            progress(stage, min(compiled / _EXPECTED_COMPILE_STEPS, 0.99))
    if proc.wait() != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{''.join(tail)}")
    progress(stage, 1.0)


def _make(source: Path, target: str) -> None:
    _run(["make", target], source)


def _run(cmd: list[str], cwd: Path) -> None:
    result = subprocess.run(cmd, cwd=cwd, env=_make_env(), capture_output=True, text=True)
    if result.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")


def _make_env() -> dict[str, str]:
    return {**os.environ, **_REPRODUCIBLE_ENV}


def _compiler_version() -> str:
    try:
        return subprocess.run(["gcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ""
