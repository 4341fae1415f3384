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
# ~2 minutes under kvm_pvm on a loaded 2-core machine (guest kernel emulated).
INIT_TIMEOUT_S = 600


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


def test_boot_to_init_with_vsock_probed_then_ten_forks_keep_running(guest, tmp_path):
    vmlinux, initramfs = guest
    console = bytearray()
    holder: list = []

    def sink(data: bytes) -> None:
        # Runs in the vCPU thread: stop right after the kernel announces /init, before init runs.
        console.extend(data)
        if console.endswith(b"Run /init as init process\r\n") and holder:
            holder[0].request_stop()

    machine = boot_linux(vmlinux, initramfs, "tsc=reliable", 128, tmp_path / "boot.sock", sink)
    holder.append(machine)
    machine.start()
    try:
        assert machine.wait(INIT_TIMEOUT_S), f"no /init after {INIT_TIMEOUT_S} s: {bytes(console[-2000:])!r}"
        assert machine.exit_status is None, machine.exit_reason
        assert b"Run /init as init process" in console
        transport = machine.devices["vsock"][1].transport
        assert transport.activated, "the guest's virtio-vsock driver did not set DRIVER_OK"
        assert all(queue.ready for queue in transport.queues)
        machine.snapshot(tmp_path / "snap")
        snapshot_time = _timestamps(console)[-1]
    finally:
        machine.kill()
    template = Template.load(tmp_path / "snap")
    for i in range(10):
        child = fork(template, name=f"boot-fork-{i}", vsock_path=tmp_path / f"f{i}.sock")
        serial = child.devices["ttyS0"][1]
        child.start()
        try:
            # The fork goes on from /init: the console prints later kernel messages (on this
            # host, init's first system call faults, see shared/notes/host-kvm.md).
            deadline = time.monotonic() + 60
            while not [t for t in _timestamps(serial.output) if t > snapshot_time]:
                assert child.exit_status is None, child.exit_reason
                assert time.monotonic() < deadline, f"fork {i} printed nothing new: {serial.text()!r}"
                time.sleep(0.1)
            assert b"Linux version" not in serial.output  # continued, not rebooted
            child.pause()
            assert k.get_regs(child.vcpu.fd).rip >= 0xFFFFFFFF80000000  # in the guest kernel
            assert child.devices["vsock"][1].transport.activated  # device state came along
        finally:
            child.kill()
