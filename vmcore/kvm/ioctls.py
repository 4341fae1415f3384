"""One function per KVM ioctl vmcore uses. Failures raise KvmError naming the ioctl.

libc's ioctl is called through ctypes rather than fcntl.ioctl so that EINTR reaches the caller
unretried: a vCPU thread is kicked out of KVM_RUN by a signal and must see the interruption.
"""

from __future__ import annotations

import ctypes
import errno
import os

from vmcore.kvm import structs as s

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int

KVMIO = 0xAE
_WRITE, _READ = 1, 2


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed; the message names it."""

    def __init__(self, name: str, err: int, detail: str = "") -> None:
        super().__init__(err, f"{name}: {detail or os.strerror(err)}")
        self.ioctl = name


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, struct: type) -> int:
    return _ioc(_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type) -> int:
    return _ioc(_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type) -> int:
    return _ioc(_READ | _WRITE, nr, ctypes.sizeof(struct))


class _MsrsHeader(ctypes.Structure):
    _fields_ = [("nmsrs", ctypes.c_uint32), ("pad", ctypes.c_uint32)]


class _Cpuid2Header(ctypes.Structure):
    _fields_ = [("nent", ctypes.c_uint32), ("padding", ctypes.c_uint32)]


class _MsrListHeader(ctypes.Structure):
    _fields_ = [("nmsrs", ctypes.c_uint32)]


class _IrqRoutingHeader(ctypes.Structure):
    _fields_ = [("nr", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


# System ioctls (on the /dev/kvm fd).
GET_API_VERSION = _io(0x00)
CREATE_VM = _io(0x01)
GET_MSR_INDEX_LIST = _iowr(0x02, _MsrListHeader)
CHECK_EXTENSION = _io(0x03)
GET_VCPU_MMAP_SIZE = _io(0x04)
GET_SUPPORTED_CPUID = _iowr(0x05, _Cpuid2Header)
# VM ioctls.
CREATE_VCPU = _io(0x41)
SET_USER_MEMORY_REGION = _iow(0x46, s.KvmUserspaceMemoryRegion)
SET_TSS_ADDR = _io(0x47)
SET_IDENTITY_MAP_ADDR = _iow(0x48, ctypes.c_uint64)
CREATE_IRQCHIP = _io(0x60)
IRQ_LINE = _iow(0x61, s.KvmIrqLevel)
GET_IRQCHIP = _iowr(0x62, s.KvmIrqchip)
SET_IRQCHIP = _ior(0x63, s.KvmIrqchip)  # sic: the kernel header declares it _IOR
IRQFD = _iow(0x76, s.KvmIrqfd)
CREATE_PIT2 = _iow(0x77, s.KvmPitConfig)
IOEVENTFD = _iow(0x79, s.KvmIoeventfd)
SET_CLOCK = _iow(0x7B, s.KvmClockData)
GET_CLOCK = _ior(0x7C, s.KvmClockData)
GET_PIT2 = _ior(0x9F, s.KvmPitState2)
SET_PIT2 = _iow(0xA0, s.KvmPitState2)
# vCPU ioctls.
RUN = _io(0x80)
GET_REGS = _ior(0x81, s.KvmRegs)
SET_REGS = _iow(0x82, s.KvmRegs)
GET_SREGS = _ior(0x83, s.KvmSregs)
SET_SREGS = _iow(0x84, s.KvmSregs)
TRANSLATE = _iowr(0x85, s.KvmTranslation)
GET_MSRS = _iowr(0x88, _MsrsHeader)
SET_MSRS = _iow(0x89, _MsrsHeader)
GET_FPU = _ior(0x8C, s.KvmFpu)
SET_FPU = _iow(0x8D, s.KvmFpu)
GET_LAPIC = _ior(0x8E, s.KvmLapicState)
SET_LAPIC = _iow(0x8F, s.KvmLapicState)
SET_CPUID2 = _iow(0x90, _Cpuid2Header)
GET_MP_STATE = _ior(0x98, s.KvmMpState)
SET_MP_STATE = _iow(0x99, s.KvmMpState)
GET_VCPU_EVENTS = _ior(0x9F, s.KvmVcpuEvents)
SET_VCPU_EVENTS = _iow(0xA0, s.KvmVcpuEvents)
GET_DEBUGREGS = _ior(0xA1, s.KvmDebugregs)
SET_DEBUGREGS = _iow(0xA2, s.KvmDebugregs)
GET_XSAVE = _ior(0xA4, s.KvmXsave)
SET_XSAVE = _iow(0xA5, s.KvmXsave)
GET_XCRS = _ior(0xA6, s.KvmXcrs)
SET_XCRS = _iow(0xA7, s.KvmXcrs)

CAP_IRQCHIP = 0
CAP_USER_MEMORY = 3
CAP_SET_TSS_ADDR = 4
CAP_PIT2 = 33
CAP_IOEVENTFD = 36
CAP_IRQFD = 32
CAP_VCPU_EVENTS = 41
CAP_DEBUGREGS = 50
CAP_XSAVE = 55
CAP_XCRS = 56
CAP_KVMCLOCK_CTRL = 76
CAP_NR_MEMSLOTS = 10

MEM_READONLY = 1 << 1
IOEVENTFD_FLAG_DATAMATCH = 1 << 0
IOEVENTFD_FLAG_PIO = 1 << 1
PIT_SPEAKER_DUMMY = 1
IRQCHIP_PIC_MASTER, IRQCHIP_PIC_SLAVE, IRQCHIP_IOAPIC = 0, 1, 2
VCPU_EVENTS_FLAGS = 0x1 | 0x2 | 0x4  # NMI_PENDING | SIPI_VECTOR | SHADOW: restore them all


def _call(fd: int, name: str, request: int, arg: object) -> int:
    """ioctl(fd, request, arg); arg is an int or a ctypes object passed by reference."""
    ptr = arg if isinstance(arg, int) else ctypes.addressof(arg)
    ret = _libc.ioctl(fd, request, ptr)
    if ret < 0:
        raise KvmError(name, ctypes.get_errno())
    return ret


def get_api_version(kvm_fd: int) -> int:
    return _call(kvm_fd, "KVM_GET_API_VERSION", GET_API_VERSION, 0)


def create_vm(kvm_fd: int) -> int:
    return _call(kvm_fd, "KVM_CREATE_VM", CREATE_VM, 0)


def check_extension(fd: int, cap: int) -> int:
    return _call(fd, "KVM_CHECK_EXTENSION", CHECK_EXTENSION, cap)


def get_vcpu_mmap_size(kvm_fd: int) -> int:
    return _call(kvm_fd, "KVM_GET_VCPU_MMAP_SIZE", GET_VCPU_MMAP_SIZE, 0)


def get_msr_index_list(kvm_fd: int) -> list[int]:
    count = 64
    while True:
        msr_list = s.kvm_msr_list(count)
        try:
            _call(kvm_fd, "KVM_GET_MSR_INDEX_LIST", GET_MSR_INDEX_LIST, msr_list)
        except KvmError as exc:
            # E2BIG tells the size needed, written back into nmsrs.
            if exc.errno != errno.E2BIG or msr_list.nmsrs <= count:
                raise
            count = msr_list.nmsrs
            continue
        return list(msr_list.indices[: msr_list.nmsrs])


def get_supported_cpuid(kvm_fd: int) -> ctypes.Structure:
    count = 128
    while True:
        cpuid = s.kvm_cpuid2(count)
        try:
            _call(kvm_fd, "KVM_GET_SUPPORTED_CPUID", GET_SUPPORTED_CPUID, cpuid)
        except KvmError as exc:
            if exc.errno != errno.E2BIG or count >= 4096:
                raise
            count *= 2
            continue
        return cpuid


def create_vcpu(vm_fd: int, vcpu_id: int) -> int:
    return _call(vm_fd, "KVM_CREATE_VCPU", CREATE_VCPU, vcpu_id)


def set_user_memory_region(vm_fd: int, region: s.KvmUserspaceMemoryRegion) -> None:
    _call(vm_fd, "KVM_SET_USER_MEMORY_REGION", SET_USER_MEMORY_REGION, region)


def set_tss_addr(vm_fd: int, addr: int) -> None:
    _call(vm_fd, "KVM_SET_TSS_ADDR", SET_TSS_ADDR, addr)


def set_identity_map_addr(vm_fd: int, addr: int) -> None:
    _call(vm_fd, "KVM_SET_IDENTITY_MAP_ADDR", SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))


def create_irqchip(vm_fd: int) -> None:
    _call(vm_fd, "KVM_CREATE_IRQCHIP", CREATE_IRQCHIP, 0)


def irq_line(vm_fd: int, irq: int, level: int) -> None:
    _call(vm_fd, "KVM_IRQ_LINE", IRQ_LINE, s.KvmIrqLevel(irq=irq, level=level))


def get_irqchip(vm_fd: int, chip_id: int) -> s.KvmIrqchip:
    chip = s.KvmIrqchip(chip_id=chip_id)
    _call(vm_fd, "KVM_GET_IRQCHIP", GET_IRQCHIP, chip)
    return chip


def set_irqchip(vm_fd: int, chip: s.KvmIrqchip) -> None:
    _call(vm_fd, "KVM_SET_IRQCHIP", SET_IRQCHIP, chip)


def irqfd(vm_fd: int, event_fd: int, gsi: int, flags: int = 0) -> None:
    _call(vm_fd, "KVM_IRQFD", IRQFD, s.KvmIrqfd(fd=event_fd, gsi=gsi, flags=flags))


def create_pit2(vm_fd: int, flags: int = PIT_SPEAKER_DUMMY) -> None:
    _call(vm_fd, "KVM_CREATE_PIT2", CREATE_PIT2, s.KvmPitConfig(flags=flags))


def ioeventfd(vm_fd: int, event: s.KvmIoeventfd) -> None:
    _call(vm_fd, "KVM_IOEVENTFD", IOEVENTFD, event)


def get_clock(vm_fd: int) -> s.KvmClockData:
    clock = s.KvmClockData()
    _call(vm_fd, "KVM_GET_CLOCK", GET_CLOCK, clock)
    return clock


def set_clock(vm_fd: int, clock: s.KvmClockData) -> None:
    _call(vm_fd, "KVM_SET_CLOCK", SET_CLOCK, clock)


def get_pit2(vm_fd: int) -> s.KvmPitState2:
    pit = s.KvmPitState2()
    _call(vm_fd, "KVM_GET_PIT2", GET_PIT2, pit)
    return pit


def set_pit2(vm_fd: int, pit: s.KvmPitState2) -> None:
    _call(vm_fd, "KVM_SET_PIT2", SET_PIT2, pit)


def run(vcpu_fd: int) -> None:
    """KVM_RUN. Raises KvmError with errno EINTR when a signal kicked the vCPU out."""
    _call(vcpu_fd, "KVM_RUN", RUN, 0)


def _get(vcpu_fd: int, name: str, request: int, struct: type) -> ctypes.Structure:
    value = struct()
    _call(vcpu_fd, name, request, value)
    return value


def translate(fd: int, linear_address: int) -> s.KvmTranslation:
    result = s.KvmTranslation(linear_address=linear_address)
    _call(fd, "KVM_TRANSLATE", TRANSLATE, result)
    return result


def get_regs(fd: int) -> s.KvmRegs:
    return _get(fd, "KVM_GET_REGS", GET_REGS, s.KvmRegs)


def set_regs(fd: int, regs: s.KvmRegs) -> None:
    _call(fd, "KVM_SET_REGS", SET_REGS, regs)


def get_sregs(fd: int) -> s.KvmSregs:
    return _get(fd, "KVM_GET_SREGS", GET_SREGS, s.KvmSregs)


def set_sregs(fd: int, sregs: s.KvmSregs) -> None:
    _call(fd, "KVM_SET_SREGS", SET_SREGS, sregs)


def get_fpu(fd: int) -> s.KvmFpu:
    return _get(fd, "KVM_GET_FPU", GET_FPU, s.KvmFpu)


def set_fpu(fd: int, fpu: s.KvmFpu) -> None:
    _call(fd, "KVM_SET_FPU", SET_FPU, fpu)


def get_xsave(fd: int) -> s.KvmXsave:
    return _get(fd, "KVM_GET_XSAVE", GET_XSAVE, s.KvmXsave)


def set_xsave(fd: int, xsave: s.KvmXsave) -> None:
    _call(fd, "KVM_SET_XSAVE", SET_XSAVE, xsave)


def get_xcrs(fd: int) -> s.KvmXcrs:
    return _get(fd, "KVM_GET_XCRS", GET_XCRS, s.KvmXcrs)


def set_xcrs(fd: int, xcrs: s.KvmXcrs) -> None:
    _call(fd, "KVM_SET_XCRS", SET_XCRS, xcrs)


def get_msrs(fd: int, msrs: ctypes.Structure) -> int:
    """Fills msrs.entries[i].data for each index; returns how many were read."""
    return _call(fd, "KVM_GET_MSRS", GET_MSRS, msrs)


def set_msrs(fd: int, msrs: ctypes.Structure) -> int:
    return _call(fd, "KVM_SET_MSRS", SET_MSRS, msrs)


def get_lapic(fd: int) -> s.KvmLapicState:
    return _get(fd, "KVM_GET_LAPIC", GET_LAPIC, s.KvmLapicState)


def set_lapic(fd: int, lapic: s.KvmLapicState) -> None:
    _call(fd, "KVM_SET_LAPIC", SET_LAPIC, lapic)


def set_cpuid2(fd: int, cpuid: ctypes.Structure) -> None:
    _call(fd, "KVM_SET_CPUID2", SET_CPUID2, cpuid)


def get_mp_state(fd: int) -> s.KvmMpState:
    return _get(fd, "KVM_GET_MP_STATE", GET_MP_STATE, s.KvmMpState)


def set_mp_state(fd: int, mp_state: s.KvmMpState) -> None:
    _call(fd, "KVM_SET_MP_STATE", SET_MP_STATE, mp_state)


def get_vcpu_events(fd: int) -> s.KvmVcpuEvents:
    return _get(fd, "KVM_GET_VCPU_EVENTS", GET_VCPU_EVENTS, s.KvmVcpuEvents)


def set_vcpu_events(fd: int, events: s.KvmVcpuEvents) -> None:
    _call(fd, "KVM_SET_VCPU_EVENTS", SET_VCPU_EVENTS, events)


def get_debugregs(fd: int) -> s.KvmDebugregs:
    return _get(fd, "KVM_GET_DEBUGREGS", GET_DEBUGREGS, s.KvmDebugregs)


def set_debugregs(fd: int, debugregs: s.KvmDebugregs) -> None:
    _call(fd, "KVM_SET_DEBUGREGS", SET_DEBUGREGS, debugregs)
