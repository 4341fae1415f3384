"""The guest image builder: cache behaviour, archive format, and a real boot under QEMU TCG.

Everything runs against the real build (cached under $FORKVM_CACHE_DIR or ~/.cache/forkvm);
the first run on a machine builds the kernel and initramfs, which takes several minutes.
"""

from __future__ import annotations

import io
import os
import re
import selectors
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from forkvm_image import build_image, cpio, image_inputs_hash
from vmcore.engine import GuestImage

QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT_S = 240.0


def _quiet(stage: str, fraction: float | None) -> None:
    del stage, fraction


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return build_image(_quiet)


def test_cpio_archive_is_deterministic_and_readable(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "usr/bin/tool").write_bytes(b"#!/bin/sh\necho hi\n")
    (tree / "usr/bin/tool").chmod(0o700)
    (tree / "etc").mkdir()
    (tree / "etc/motd").write_text("odd length.")
    (tree / "usr/bin/alias").symlink_to("tool")
    devices = [cpio.DeviceNode("dev/console", 5, 1)]
    (tree / "dev").mkdir()

    archives = []
    for _ in range(2):
        out = io.BytesIO()
        cpio.write_archive(tree, out, devices, lambda fraction: None)
        archives.append(out.getvalue())
        os.utime(tree / "etc/motd", (1, 1))  # a different mtime must not change the archive
    assert archives[0] == archives[1]
    assert len(archives[0]) % 4 == 0

    listing = subprocess.run(
        ["cpio", "-itv", "--quiet"], input=archives[0], capture_output=True, check=True
    ).stdout.decode()
    names = [line.split()[-1] if "->" not in line else line.split()[-3] for line in listing.splitlines()]
    assert names == ["dev", "dev/console", "etc", "etc/motd", "usr", "usr/bin", "usr/bin/alias", "usr/bin/tool"]
    assert re.search(r"^-rwxr-xr-x .* usr/bin/tool$", listing, re.M)
    assert re.search(r"^crw------- .* 5,\s+1 .* dev/console$", listing, re.M)


@pytest.mark.slow
def test_second_build_is_a_fast_cache_hit(image: GuestImage) -> None:
    started = time.monotonic()
    again = build_image(_quiet)
    elapsed = time.monotonic() - started
    print(f"cache hit: {elapsed:.3f} s")
    assert elapsed < 5.0
    assert again == image
    assert image.image_hash == image_inputs_hash()
    assert image.kernel.is_file() and image.kernel.with_name("vmlinux").is_file()
    assert image.initramfs.is_file()


@pytest.mark.slow
def test_kernel_config_leaves_panic_to_the_command_line(image: GuestImage) -> None:
    config = image.kernel.with_name("config").read_text()
    assert "CONFIG_PANIC_TIMEOUT=-1" not in config
    assert "# CONFIG_MODULES is not set" in config
    assert "panic=-1" in image.cmdline.split()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(QEMU) is None, reason=f"{QEMU} is not installed")
def test_image_boots_to_python_with_numpy_zmq_ipykernel_under_qemu_tcg(image: GuestImage) -> None:
    # forkvm_init=shell: /init starts a console shell instead of the agent, so this checks the
    # kernel, /init and the Python stack without depending on the agent.
    console = SerialConsole(image, extra_cmdline="forkvm_init=shell")
    try:
        init_line = console.wait_for(rb"\[\s*([\d.]+)\] Run /init as init process")
        init_wall = time.monotonic() - console.started
        console.wait_for(rb"starting a shell on the console")
        asked = time.monotonic()
        # The marker is assembled by Python, so the console's echo of the command never matches.
        console.send(
            "/usr/bin/python3 -c 'import numpy, zmq, ipykernel.kernelapp; "
            'print("PY" + "THON-OK", numpy.__version__, zmq.__version__)\'\n'
        )
        result = console.wait_for(rb"PYTHON-OK (\S+) (\S+)\r?\n")
        print(
            f"/init at {float(init_line[1]):.2f} s guest uptime ({init_wall:.1f} s wall); "
            f"python -c 'import numpy, zmq, ipykernel.kernelapp' answered in {time.monotonic() - asked:.1f} s wall; "
            f"numpy {result[1].decode()}, pyzmq {result[2].decode()}"
        )
        console.send("reboot -f\n")  # with -no-reboot QEMU then exits
        assert console.wait_exit(30.0) == 0
    finally:
        console.close()


class SerialConsole:
    """QEMU (microvm, TCG) with the guest's ttyS0 on stdin/stdout."""

    def __init__(self, image: GuestImage, extra_cmdline: str) -> None:
        self.started = time.monotonic()
        self.output = b""
        self._searched_from = 0
        self.proc = subprocess.Popen(
            [
                QEMU, "-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max", "-m", "1024",
                "-nographic", "-no-reboot", "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
                "-append", f"{image.cmdline} init=/init {extra_cmdline}",
            ],  # fmt: skip
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert self.proc.stdout is not None
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, pattern: bytes) -> re.Match[bytes]:
        deadline = self.started + BOOT_TIMEOUT_S
        while True:
            match = re.compile(pattern).search(self.output, self._searched_from)
            if match:
                self._searched_from = match.end()
                return match
            if time.monotonic() > deadline or not self._read(deadline):
                tail = self.output[-3000:].decode(errors="replace")
                pytest.fail(f"guest never printed {pattern!r}; console ended with:\n{tail}")

    def wait_exit(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            pass
        return self.proc.wait(max(deadline - time.monotonic(), 0.1))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._selector.close()

    def _read(self, deadline: float) -> bool:
        """Read what the guest printed; False once QEMU has closed its output or time is up."""
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not self._selector.select(min(remaining, 1.0)):
            return remaining > 0 and self.proc.poll() is None
        assert self.proc.stdout is not None
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        self.output += chunk
        return bool(chunk)
