"""VM-wide device state kept by KVM: the two PICs, the IOAPIC, the PIT and the KVM clock.

Persisted layout (VERSION 1): irqchip PIC master, PIC slave, IOAPIC (520 bytes each), PIT state
(112 bytes), KVM clock (48 bytes).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.vm import Vm

VERSION = 1
_CHIPS = (k.IRQCHIP_PIC_MASTER, k.IRQCHIP_PIC_SLAVE, k.IRQCHIP_IOAPIC)
_SIZE = 3 * ctypes.sizeof(s.KvmIrqchip) + ctypes.sizeof(s.KvmPitState2) + ctypes.sizeof(
    s.KvmClockData
)


@dataclass
class VmState:
    irqchips: list[s.KvmIrqchip]
    pit: s.KvmPitState2
    clock: s.KvmClockData

    @classmethod
    def capture(cls, vm: Vm) -> "VmState":
        return cls(
            irqchips=[k.get_irqchip(vm.fd, chip) for chip in _CHIPS],
            pit=k.get_pit2(vm.fd),
            clock=k.get_clock(vm.fd),
        )

    def restore(self, vm: Vm) -> None:
        for chip in self.irqchips:
            k.set_irqchip(vm.fd, chip)
        k.set_pit2(vm.fd, self.pit)
        # Only the clock value is restored: the guest's kvmclock continues from the snapshot.
        k.set_clock(vm.fd, s.KvmClockData(clock=self.clock.clock))

    def to_bytes(self) -> bytes:
        return b"".join(bytes(chip) for chip in self.irqchips) + bytes(self.pit) + bytes(self.clock)

    @classmethod
    def from_bytes(cls, data: bytes) -> "VmState":
        if len(data) != _SIZE:
            raise ValueError(f"VM state is {len(data)} bytes, expected {_SIZE}")
        chip_size = ctypes.sizeof(s.KvmIrqchip)
        chips = [s.KvmIrqchip.from_buffer_copy(data, i * chip_size) for i in range(3)]
        if [chip.chip_id for chip in chips] != list(_CHIPS):
            raise ValueError("VM state irqchips out of order")
        offset = 3 * chip_size
        pit = s.KvmPitState2.from_buffer_copy(data, offset)
        clock = s.KvmClockData.from_buffer_copy(data, offset + ctypes.sizeof(s.KvmPitState2))
        return cls(irqchips=chips, pit=pit, clock=clock)
