"""Full vCPU state: capture from a vCPU, restore into another, and its persisted byte form.

Persisted layout (VERSION 1), little-endian, fixed order:
    regs, sregs, fpu, xsave, xcrs, lapic, mp_state, vcpu_events, debugregs (raw KVM structs)
    u32 msr count, then (u32 index, u32 reserved, u64 value) per MSR
"""

from __future__ import annotations

import ctypes
import errno
import struct
from dataclasses import dataclass, field

from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.vm import Kvm, Vcpu

VERSION = 1

_FIXED: list[tuple[str, type]] = [
    ("regs", s.KvmRegs),
    ("sregs", s.KvmSregs),
    ("fpu", s.KvmFpu),
    ("xsave", s.KvmXsave),
    ("xcrs", s.KvmXcrs),
    ("lapic", s.KvmLapicState),
    ("mp_state", s.KvmMpState),
    ("events", s.KvmVcpuEvents),
    ("debugregs", s.KvmDebugregs),
]

_readable_msrs: list[int] | None = None


def readable_msrs(vcpu: Vcpu, kvm: Kvm) -> list[int]:
    """The MSRs of KVM's index list that this host lets us read (probed once per process).

    KVM_GET_MSRS stops at the first MSR it cannot read, so each index is tried alone once.
    """
    global _readable_msrs
    if _readable_msrs is None:
        found = []
        for index in kvm.msr_indices:
            probe = s.kvm_msrs(1)
            probe.entries[0].index = index
            if k.get_msrs(vcpu.fd, probe) == 1:
                found.append(index)
        _readable_msrs = found
    return _readable_msrs


@dataclass
class VcpuState:
    regs: s.KvmRegs
    sregs: s.KvmSregs
    fpu: s.KvmFpu
    xsave: s.KvmXsave
    xcrs: s.KvmXcrs
    lapic: s.KvmLapicState
    mp_state: s.KvmMpState
    events: s.KvmVcpuEvents
    debugregs: s.KvmDebugregs
    msrs: ctypes.Structure = field(repr=False)

    @classmethod
    def capture(cls, vcpu: Vcpu, kvm: Kvm) -> "VcpuState":
        indices = readable_msrs(vcpu, kvm)
        msrs = s.kvm_msrs(len(indices))
        for entry, index in zip(msrs.entries, indices):
            entry.index = index
        read = k.get_msrs(vcpu.fd, msrs)
        if read != len(indices):
            raise k.KvmError("KVM_GET_MSRS", errno.EIO, f"MSR {indices[read]:#x} unreadable")
        return cls(
            regs=k.get_regs(vcpu.fd),
            sregs=k.get_sregs(vcpu.fd),
            fpu=k.get_fpu(vcpu.fd),
            xsave=k.get_xsave(vcpu.fd),
            xcrs=k.get_xcrs(vcpu.fd),
            lapic=k.get_lapic(vcpu.fd),
            mp_state=k.get_mp_state(vcpu.fd),
            events=k.get_vcpu_events(vcpu.fd),
            debugregs=k.get_debugregs(vcpu.fd),
            msrs=msrs,
        )

    def restore(self, vcpu: Vcpu) -> None:
        """Order matters: LAPIC before MSRs (TSC deadline), events last (pending injections)."""
        fd = vcpu.fd
        k.set_mp_state(fd, self.mp_state)
        k.set_regs(fd, self.regs)
        k.set_sregs(fd, self.sregs)
        k.set_fpu(fd, self.fpu)
        k.set_xsave(fd, self.xsave)
        k.set_xcrs(fd, self.xcrs)
        k.set_debugregs(fd, self.debugregs)
        k.set_lapic(fd, self.lapic)
        written = k.set_msrs(fd, self.msrs)
        if written != self.msrs.nmsrs:
            raise k.KvmError(
                "KVM_SET_MSRS", errno.EINVAL, f"MSR {self.msrs.entries[written].index:#x} refused"
            )
        events = s.KvmVcpuEvents.from_buffer_copy(self.events)
        events.flags |= k.VCPU_EVENTS_FLAGS
        k.set_vcpu_events(fd, events)

    def to_bytes(self) -> bytes:
        parts = [bytes(getattr(self, name)) for name, _ in _FIXED]
        parts.append(struct.pack("<I", self.msrs.nmsrs))
        parts.append(bytes(self.msrs.entries))
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "VcpuState":
        offset = 0
        values = {}
        for name, struct_type in _FIXED:
            size = ctypes.sizeof(struct_type)
            if offset + size > len(data):
                raise ValueError("vCPU state truncated")
            values[name] = struct_type.from_buffer_copy(data, offset)
            offset += size
        (count,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + count * ctypes.sizeof(s.KvmMsrEntry) != len(data):
            raise ValueError("vCPU state MSR list has the wrong length")
        msrs = s.kvm_msrs(count)
        ctypes.memmove(msrs.entries, data[offset:], count * ctypes.sizeof(s.KvmMsrEntry))
        return cls(msrs=msrs, **values)
