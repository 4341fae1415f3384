"""The guest-image kernel under vmcore on real /dev/kvm, with a busybox initramfs built here.

Slow: on software-KVM hosts the guest kernel runs in KVM's instruction emulator (~1 us per
instruction), so a boot takes tens of seconds.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.vmcore.initramfs import build_busybox_initramfs, busybox_available
from vmcore.fork import Template, fork
from vmcore.kvm import ioctls as k
from vmcore.linux_vm import boot_linux

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("kvm_available")]


def _cached_vmlinux() -> Path | None:
    try:
        from forkvm_image import cache, kernel_build

        entry = cache.lookup("kernel", kernel_build.kernel_inputs_hash())
        if entry is not None and (entry / "vmlinux").exists():
            return entry / "vmlinux"
    except Exception:  # the image package may be absent or its inputs missing on this host
        pass
    for complete in sorted(Path.home().glob(".cache/forkvm/kernel/*/.complete")):
        if (complete.parent / "vmlinux").exists():
            return complete.parent / "vmlinux"
    return None


@pytest.fixture(scope="module")
def guest(tmp_path_factory):
    vmlinux = _cached_vmlinux()
    if vmlinux is None:
        pytest.skip("no built guest kernel in ~/.cache/forkvm/kernel (build it with forkvm_image)")
    if not busybox_available():
        pytest.skip("busybox is not installed")
    initramfs = build_busybox_initramfs(tmp_path_factory.mktemp("initramfs") / "initramfs.cpio")
    return vmlinux, initramfs


def _timestamps(console: bytes) -> list[float]:
    return [float(m) for m in re.findall(rb"^\[\s*(\d+\.\d+)\]", bytes(console), re.M)]


def _wait_for(machine, text: bytes, timeout: float, stall: float = 60.0) -> bool:
    """Wait for `text` on the console; give up early once the console has been silent for
    `stall` seconds (a wedged guest)."""
    serial = machine.devices["ttyS0"][1]
    deadline = time.monotonic() + timeout
    seen, last_change = 0, time.monotonic()
    while time.monotonic() < deadline and machine.exit_status is None:
        if text in serial.output:
            return True
        if len(serial.output) != seen:
            seen, last_change = len(serial.output), time.monotonic()
        elif time.monotonic() - last_change > stall:
            break
        time.sleep(0.2)
    return text in serial.output


def test_snapshot_of_booting_kernel_forks_ten_times_and_each_keeps_running(guest, tmp_path):
    vmlinux, initramfs = guest
    machine = boot_linux(vmlinux, initramfs, "tsc=reliable", 128, tmp_path / "boot.sock")
    machine.start()
    try:
        assert _wait_for(machine, b"Memory:", 120), machine.devices["ttyS0"][1].text()[-2000:]
        machine.snapshot(tmp_path / "snap")
        snapshot_time = _timestamps(machine.devices["ttyS0"][1].output)[-1]
    finally:
        machine.kill()
    template = Template.load(tmp_path / "snap")
    for i in range(10):
        child = fork(template, name=f"boot-fork-{i}", vsock_path=tmp_path / f"f{i}.sock")
        serial = child.devices["ttyS0"][1]
        child.start()
        try:
            # The console goes on with the boot log, later in guest time than the snapshot.
            deadline = time.monotonic() + 60
            while not [t for t in _timestamps(serial.output) if t > snapshot_time]:
                assert child.exit_status is None, child.exit_reason
                assert time.monotonic() < deadline, f"fork {i} printed nothing new: {serial.text()!r}"
                time.sleep(0.2)
            assert b"Linux version" not in serial.output  # continued, not rebooted
            child.pause()
            assert k.get_regs(child.vcpu.fd).rip >= 0xFFFFFFFF80000000  # in the guest kernel
        finally:
            child.kill()


@pytest.mark.xfail(
    reason="on this kvm_pvm host the guest kernel's direct-map page table is overwritten right "
    "after 'Mountpoint-cache hash table entries' (a printk memmove whose length loop does not "
    "terminate under KVM's emulator), so boot never reaches /init; see the vmcore report",
    strict=False,
)
def test_boot_reaches_init_with_vsock_probed(guest, tmp_path):
    vmlinux, initramfs = guest
    machine = boot_linux(vmlinux, initramfs, "tsc=reliable", 128, tmp_path / "boot.sock")
    machine.start()
    try:
        assert _wait_for(machine, b"Run /init", 300), machine.devices["ttyS0"][1].text()[-2000:]
        transport = machine.devices["vsock"][1].transport
        assert transport.activated and all(queue.ready for queue in transport.queues)
        assert "virtio_mmio" in machine.devices["ttyS0"][1].text() or transport.activated
    finally:
        machine.kill()
