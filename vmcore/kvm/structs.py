"""ctypes mirrors of the x86-64 KVM structures vmcore passes to ioctls (linux/kvm.h, asm/kvm.h).

Sizes are asserted at import so a layout mistake fails loudly instead of corrupting vCPU state.
"""

from __future__ import annotations

import ctypes
from ctypes import c_int32, c_int64, c_uint8, c_uint16, c_uint32, c_uint64


class KvmRegs(ctypes.Structure):
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class KvmSegment(ctypes.Structure):
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class KvmDtable(ctypes.Structure):
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class KvmSregs(ctypes.Structure):
    _fields_ = [
        *[(name, KvmSegment) for name in "cs ds es fs gs ss tr ldt".split()],
        ("gdt", KvmDtable),
        ("idt", KvmDtable),
        *[(name, c_uint64) for name in "cr0 cr2 cr3 cr4 cr8 efer apic_base".split()],
        ("interrupt_bitmap", c_uint64 * 4),
    ]


class KvmFpu(ctypes.Structure):
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class KvmMsrEntry(ctypes.Structure):
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


def kvm_msrs(count: int) -> ctypes.Structure:
    """struct kvm_msrs with room for `count` entries (a flexible array in C)."""

    class KvmMsrs(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32), ("entries", KvmMsrEntry * count)]

    return KvmMsrs(nmsrs=count)


def kvm_msr_list(count: int) -> ctypes.Structure:
    class KvmMsrList(ctypes.Structure):
        _fields_ = [("nmsrs", c_uint32), ("indices", c_uint32 * count)]

    return KvmMsrList(nmsrs=count)


class KvmCpuidEntry2(ctypes.Structure):
    _fields_ = [
        *[(name, c_uint32) for name in "function index flags eax ebx ecx edx".split()],
        ("padding", c_uint32 * 3),
    ]


def kvm_cpuid2(count: int) -> ctypes.Structure:
    class KvmCpuid2(ctypes.Structure):
        _fields_ = [("nent", c_uint32), ("padding", c_uint32), ("entries", KvmCpuidEntry2 * count)]

    return KvmCpuid2(nent=count)


class KvmLapicState(ctypes.Structure):
    _fields_ = [("regs", c_uint8 * 1024)]


class KvmMpState(ctypes.Structure):
    _fields_ = [("mp_state", c_uint32)]


class _ExceptionEvent(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _InterruptEvent(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _NmiEvent(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _SmiEvent(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class KvmVcpuEvents(ctypes.Structure):
    _fields_ = [
        ("exception", _ExceptionEvent),
        ("interrupt", _InterruptEvent),
        ("nmi", _NmiEvent),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _SmiEvent),
        ("reserved", c_uint8 * 27),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class KvmDebugregs(ctypes.Structure):
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class KvmXsave(ctypes.Structure):
    _fields_ = [("region", c_uint32 * 1024)]


class KvmXcr(ctypes.Structure):
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class KvmXcrs(ctypes.Structure):
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", KvmXcr * 16),
        ("padding", c_uint64 * 16),
    ]


class KvmUserspaceMemoryRegion(ctypes.Structure):
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class KvmPicState(ctypes.Structure):
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr irr imr isr priority_add irq_base read_reg_select poll special_mask "
            "init_state auto_eoi rotate_on_auto_eoi special_fully_nested_mode init4 elcr "
            "elcr_mask"
        ).split()
    ]


class KvmIoapicRedirEntry(ctypes.Structure):
    _fields_ = [("bits", c_uint64)]


class KvmIoapicState(ctypes.Structure):
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", KvmIoapicRedirEntry * 24),
    ]


class _IrqchipUnion(ctypes.Union):
    _fields_ = [("dummy", c_uint8 * 512), ("pic", KvmPicState), ("ioapic", KvmIoapicState)]


class KvmIrqchip(ctypes.Structure):
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _IrqchipUnion)]


class KvmPitChannelState(ctypes.Structure):
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        *[
            (name, c_uint8)
            for name in (
                "count_latched status_latched status read_state write_state write_latch "
                "rw_mode mode bcd gate"
            ).split()
        ],
        ("count_load_time", c_int64),
    ]


class KvmPitState2(ctypes.Structure):
    _fields_ = [
        ("channels", KvmPitChannelState * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class KvmPitConfig(ctypes.Structure):
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class KvmClockData(ctypes.Structure):
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class KvmIrqfd(ctypes.Structure):
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class KvmIoeventfd(ctypes.Structure):
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


class KvmTranslation(ctypes.Structure):
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


_EXPECTED_SIZES = {
    KvmTranslation: 24,
    KvmRegs: 144,
    KvmSegment: 24,
    KvmSregs: 312,
    KvmFpu: 416,
    KvmMsrEntry: 16,
    KvmCpuidEntry2: 40,
    KvmLapicState: 1024,
    KvmVcpuEvents: 64,
    KvmDebugregs: 128,
    KvmXsave: 4096,
    KvmXcrs: 392,
    KvmUserspaceMemoryRegion: 32,
    KvmIrqchip: 520,
    KvmPitState2: 112,
    KvmPitConfig: 64,
    KvmClockData: 48,
    KvmIrqLevel: 8,
    KvmIrqfd: 32,
    KvmIoeventfd: 64,
}
for _struct, _size in _EXPECTED_SIZES.items():
    assert ctypes.sizeof(_struct) == _size, (_struct.__name__, ctypes.sizeof(_struct), _size)
