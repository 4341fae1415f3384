"""Builds the guest's root filesystem: an uncompressed newc cpio initramfs.

Contents: static busybox, the host's CPython 3.11 with a trimmed standard library, the
pinned site-packages from requirements.txt, the forkvm guest agent, the shared libraries all
of these load, and /init. Every .py file is compiled ahead of time because the guest may run
under an emulated CPU, where compiling at import time is expensive.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vmcore.agent_protocol
from vmcore.engine import ProgressCallback

from . import cache, cpio, sharedlibs

PYTHON_VERSION = "3.11"
HERE = Path(__file__).parent
REQUIREMENTS = HERE / "requirements.txt"
INIT_SCRIPT = HERE / "init"
AGENT_SOURCE = HERE / "agent" / "forkvm_agent"
PROTOCOL_SOURCE = Path(vmcore.agent_protocol.__file__)
BUILD_SCRIPTS = [Path(__file__), HERE / "cpio.py", HERE / "sharedlibs.py"]

GUEST_STDLIB = f"usr/lib/python{PYTHON_VERSION}"
GUEST_SITE_PACKAGES = f"{GUEST_STDLIB}/site-packages"
GUEST_LIBDIR = "usr/lib"  # one of the dynamic loader's built-in search directories

# Parts of the standard library a kernel never imports: test suites, GUI toolkits, the
# pip bootstrapper, the static library/Makefile used only to build extensions, and the
# host's own site-packages (the image gets its own from requirements.txt).
_STDLIB_SKIP_TOP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages"}
_STDLIB_SKIP_ANYWHERE = {"__pycache__", "test", "tests", "idle_test"}
# nis (deprecated, gone in 3.13) alone would pull in libtirpc and the whole Kerberos stack.
_DYNLOAD_SKIP = re.compile(r"^(_test|_ctypes_test|_xxtestfuzz|xxlimited|_tkinter|nis\.)")

# Files in wheels that nothing imports at run time: test suites, type stubs, C sources and
# headers (there is no compiler in the guest), and other platforms' debugger helpers.
_SITE_SKIP_DIRS = {"__pycache__", "test", "tests"}
_SITE_SKIP_SUFFIXES = {".pyi", ".c", ".h", ".pyx", ".pxd", ".a", ".dll", ".exe", ".dylib", ".pdb"}
# jedi (IPython's completer) reads its stdlib stubs; the third-party ones describe packages
# that are not in the image, and jedi skips the directories when they are absent. debugpy's
# Windows process-attach helpers cannot run in a Linux guest.
_SITE_SKIP_PATHS = {
    "jedi/third_party/typeshed/stubs",
    "jedi/third_party/django-stubs",
    "debugpy/_vendored/pydevd/pydevd_attach_to_process/winappdbg",
    "debugpy/_vendored/pydevd/pydevd_attach_to_process/windows",
}
_KEEP_PYI_UNDER = "jedi/"
# pip's bin/ holds console scripts whose shebangs name the host's interpreter; share/ holds
# data for a Jupyter installation (kernelspecs), not for a kernel.
_SITE_TOP_LEVEL_SKIP = {"bin", "share"}

_DEVICES = [cpio.DeviceNode("dev/console", 5, 1), cpio.DeviceNode("dev/null", 1, 3, stat.S_IFCHR | 0o666)]
_EMPTY_DIRS = ["proc", "sys", "dev", "tmp", "run", "root", "etc", "usr/sbin", "sbin"]
_ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\n",
    "etc/group": "root:x:0:\n",
    "etc/hosts": "127.0.0.1\tlocalhost forkvm\n",
    "etc/nsswitch.conf": "passwd: files\ngroup: files\nhosts: files\n",
    "etc/hostname": "forkvm\n",
}


class RootfsBuildError(RuntimeError):
    pass


def rootfs_inputs_hash() -> str:
    _check_host_python()
    busybox = _busybox()
    return cache.digest(
        [
            sys.version,
            sys.base_prefix,
            hashlib.sha256(busybox.read_bytes()).hexdigest(),
            *cache.file_digests([REQUIREMENTS, INIT_SCRIPT, *BUILD_SCRIPTS], relative_to=HERE),
            *cache.file_digests(cache.tree_files(AGENT_SOURCE), relative_to=HERE),
            *cache.file_digests([PROTOCOL_SOURCE], relative_to=PROTOCOL_SOURCE.parent),
        ]
    )


def build_initramfs(progress: ProgressCallback) -> Path:
    key = rootfs_inputs_hash()
    entry = cache.lookup("initramfs", key) or cache.build_entry(
        "initramfs", key, lambda out: _build_into(out, progress)
    )
    return entry / "initramfs.cpio"


def _build_into(out: Path, progress: ProgressCallback) -> None:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="forkvm-rootfs-") as staging_dir:
        root = Path(staging_dir)
        progress("initramfs: busybox, CPython and its standard library", None)
        _skeleton(root)
        _busybox_tree(root)
        _python_tree(root)
        progress("initramfs: pip install -r requirements.txt", None)
        _site_packages(root)
        _agent(root)
        progress("initramfs: shared libraries (ldd)", None)
        _shared_libraries(root)
        progress("initramfs: strip debug information", None)
        _strip_debug_info(root)
        _compile_bytecode(root, progress)
        stage = "initramfs: write cpio"
        target = out / "initramfs.cpio"
        with target.open("wb") as archive:
            cpio.write_archive(root, archive, _DEVICES, lambda fraction: progress(stage, fraction))
    size_mb = target.stat().st_size / 1e6
    progress(f"initramfs: {size_mb:.1f} MB, built in {time.monotonic() - started:.0f} s", 1.0)


def _check_host_python() -> None:
    if f"{sys.version_info.major}.{sys.version_info.minor}" != PYTHON_VERSION:
        raise RootfsBuildError(f"the guest image is built from CPython {PYTHON_VERSION}, this is {sys.version}")


def _busybox() -> Path:
    found = shutil.which("busybox") or "/bin/busybox"
    if not Path(found).exists():
        raise RootfsBuildError("busybox is missing: apt-get install busybox-static")
    return Path(found).resolve()


def _skeleton(root: Path) -> None:
    for directory in _EMPTY_DIRS:
        (root / directory).mkdir(parents=True, exist_ok=True)
    for name, text in _ETC_FILES.items():
        (root / name).write_text(text)
    shutil.copy2(INIT_SCRIPT, root / "init")
    (root / "init").chmod(0o755)


def _busybox_tree(root: Path) -> None:
    (root / "bin").mkdir(exist_ok=True)
    shutil.copy2(_busybox(), root / "bin/busybox")
    applets = subprocess.run(["bin/busybox", "--list-full"], cwd=root, capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        link = root / applet
        if link.exists() or link.is_symlink():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")


def _python_tree(root: Path) -> None:
    prefix = Path(sys.base_prefix)
    (root / "usr/bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2((prefix / "bin" / f"python{PYTHON_VERSION}").resolve(), root / f"usr/bin/python{PYTHON_VERSION}")
    (root / "usr/bin/python3").symlink_to(f"python{PYTHON_VERSION}")
    stdlib = prefix / "lib" / f"python{PYTHON_VERSION}"

    def skip(directory: str, names: list[str]) -> set[str]:
        top = Path(directory) == stdlib
        dynload = Path(directory).name == "lib-dynload"
        return {
            name
            for name in names
            if name in _STDLIB_SKIP_ANYWHERE
            or (top and (name in _STDLIB_SKIP_TOP or name.startswith("config-")))
            or (dynload and _DYNLOAD_SKIP.match(name))
        }

    shutil.copytree(stdlib, root / GUEST_STDLIB, symlinks=True, ignore=skip)


def _site_packages(root: Path) -> None:
    target = root / GUEST_SITE_PACKAGES
    with tempfile.TemporaryDirectory(prefix="forkvm-pip-") as pip_dir:
        cmd = [
            sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-compile", "--only-binary=:all:", "--target", pip_dir, "-r", str(REQUIREMENTS),
        ]  # fmt: skip
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RootfsBuildError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}{result.stderr[-4000:]}")
        installed = Path(pip_dir)

        def skip(directory: str, names: list[str]) -> set[str]:
            relative = Path(directory).relative_to(installed)
            return {name for name in names if _skip_site_file(relative / name, Path(directory, name).is_dir())}

        shutil.copytree(installed, target, symlinks=True, ignore=skip)


def _skip_site_file(relative: Path, is_dir: bool) -> bool:
    if relative.as_posix() in _SITE_TOP_LEVEL_SKIP:
        return True
    if is_dir:
        return relative.name in _SITE_SKIP_DIRS or relative.as_posix() in _SITE_SKIP_PATHS
    if relative.suffix == ".pyi" and relative.as_posix().startswith(_KEEP_PYI_UNDER):
        return False
    return relative.suffix in _SITE_SKIP_SUFFIXES


def _agent(root: Path) -> None:
    package = root / GUEST_SITE_PACKAGES / "forkvm_agent"
    package.mkdir(parents=True)
    for source in cache.tree_files(AGENT_SOURCE):
        if source.suffix == ".py":
            destination = package / source.relative_to(AGENT_SOURCE)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    # The protocol module is the single definition shared by host and guest.
    shutil.copy2(PROTOCOL_SOURCE, package / "agent_protocol.py")


def _shared_libraries(root: Path) -> None:
    files = [path for path in sorted(root.rglob("*")) if path.is_file() and not path.is_symlink()]
    elf_files = [path for path in files if sharedlibs.is_elf(path)]
    libdir = root / GUEST_LIBDIR
    for library in sorted(sharedlibs.needed_libraries(elf_files, provided_by=root)):
        # The loader must sit at the path compiled into every executable; the rest go
        # where the loader searches by default.
        is_loader = library.name.startswith("ld-linux")
        destination = root / library.relative_to("/") if is_loader else libdir / library.name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(library.resolve(), destination)
        destination.chmod(0o755)


def _strip_debug_info(root: Path) -> None:
    """The host interpreter carries DWARF (libpython alone is 23 MB); the guest has no debugger.

    Only the interpreter's own files: wheels ship stripped libraries whose patchelf-edited
    layout `strip` breaks ("ELF load command address/offset not page-aligned").
    """
    interpreter = [
        root / f"usr/bin/python{PYTHON_VERSION}",
        *(root / GUEST_LIBDIR).glob("libpython*"),
        *(root / GUEST_STDLIB / "lib-dynload").glob("*.so"),
    ]
    result = subprocess.run(["strip", "--strip-debug", *map(str, interpreter)], capture_output=True, text=True)
    if result.returncode != 0:
        raise RootfsBuildError(f"strip --strip-debug failed:\n{result.stderr[-4000:]}")


def _compile_bytecode(root: Path, progress: ProgressCallback) -> None:
    """unchecked-hash pycs: valid whatever the archive's mtimes, never re-validated at import."""
    stage = "initramfs: compile bytecode"
    tree = root / GUEST_STDLIB
    total = sum(1 for _ in tree.rglob("*.py")) or 1
    cmd = [
        sys.executable, "-m", "compileall", "--invalidation-mode", "unchecked-hash", "-j", "0",
        "-s", str(root), "-p", "/", str(tree),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    done = 0
    errors: list[str] = []
    for line in proc.stdout:
        if line.startswith("Compiling "):
            done += 1
            if done % 200 == 0:
                progress(stage, min(done / total, 1.0))
        elif not line.startswith("Listing "):
            errors.append(line)
    if proc.wait() != 0:
        raise RootfsBuildError(f"{' '.join(cmd)} failed:\n{''.join(errors[-40:])}")
    progress(stage, 1.0)
