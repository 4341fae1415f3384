"""A MicroVm booting Linux: 16550 console on ttyS0, virtio-vsock on virtio-mmio, kernel loaded
for the 64-bit boot protocol, CPU features the host's KVM cannot emulate hidden on the command
line."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from vmcore import compat, x86_setup
from vmcore.devices import registry
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import Vm
from vmcore.linux_loader import load_linux
from vmcore.microvm import MicroVm

VSOCK_MMIO_BASE = 0xD0000000
VSOCK_IRQ = 5
SERIAL_IRQ = 4
GUEST_CID = 3

SERIAL_SPEC = registry.DeviceSpec("serial", "ttyS0", {"port": 0x3F8, "irq": SERIAL_IRQ})
VSOCK_SPEC = registry.DeviceSpec(
    "virtio-vsock", "vsock", {"base": VSOCK_MMIO_BASE, "irq": VSOCK_IRQ, "cid": GUEST_CID}
)


def device_cmdline() -> str:
    return f"virtio_mmio.device=4K@{VSOCK_MMIO_BASE:#x}:{VSOCK_IRQ}"


def boot_linux(
    kernel: Path,
    initramfs: Path | None,
    cmdline: str,
    memory_mib: int,
    vsock_path: Path,
    serial_sink: Callable[[bytes], None] | None = None,
    name: str = "linux",
) -> MicroVm:
    """A paused VM about to enter the kernel; call start()."""
    full_cmdline = compat.compat_cmdline(f"{cmdline} console=ttyS0 {device_cmdline()}")
    memory = GuestMemory.anonymous(memory_mib << 20, name=name)
    machine = MicroVm(Vm(), memory, name=name)
    try:
        loaded = load_linux(memory, kernel, initramfs, full_cmdline)
        registry.build(machine, SERIAL_SPEC, serial_sink=serial_sink)
        registry.build(machine, VSOCK_SPEC, vsock_path=vsock_path)
        x86_setup.enter_long_mode(machine.vcpu, memory, loaded.entry, rsi=loaded.zero_page)
    except BaseException:
        machine.kill()
        raise
    return machine
