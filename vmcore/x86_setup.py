"""CPU state for entering a guest in real mode or in 64-bit long mode.

Long mode needs a GDT and page tables in guest memory. The layout is the conventional one for
the Linux 64-bit boot protocol: GDT at 0x500, identity page tables at 0x9000-0xbfff covering the
first 1 GiB with 2 MiB pages; nothing else may be loaded there.
"""

from __future__ import annotations

from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import Vcpu

GDT_ADDRESS = 0x500
PML4_ADDRESS = 0x9000
PDPT_ADDRESS = 0xA000
PD_ADDRESS = 0xB000
CODE64_SELECTOR = 0x10
DATA_SELECTOR = 0x18

CR0_PE, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME, EFER_LMA = 1 << 8, 1 << 10

_GDT = [
    0,
    0,
    0x00AF9B000000FFFF,  # 0x10: 64-bit code, DPL 0
    0x00CF93000000FFFF,  # 0x18: flat data, DPL 0
]


def _segment(selector: int, code: bool) -> s.KvmSegment:
    return s.KvmSegment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=0xB if code else 0x3, present=1,
        dpl=0, db=0 if code else 1, s=1, l=1 if code else 0, g=1,
    )


def enter_real_mode(vcpu: Vcpu, rip: int, rsp: int = 0) -> None:
    """CS:IP = 0:rip with flat zero-based segments."""
    sregs = k.get_sregs(vcpu.fd)
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        segment = getattr(sregs, name)
        segment.base = 0
        segment.selector = 0
    k.set_sregs(vcpu.fd, sregs)
    k.set_regs(vcpu.fd, s.KvmRegs(rip=rip, rsp=rsp, rflags=2))


def enter_long_mode(vcpu: Vcpu, memory: GuestMemory, rip: int, rsp: int = 0, rsi: int = 0) -> None:
    """64-bit mode at CPL 0, paging on with the first 1 GiB identity-mapped."""
    for i, descriptor in enumerate(_GDT):
        memory.write_u64(GDT_ADDRESS + 8 * i, descriptor)
    memory.write(PML4_ADDRESS, bytes(3 * 4096))
    memory.write_u64(PML4_ADDRESS, PDPT_ADDRESS | 0x3)
    memory.write_u64(PDPT_ADDRESS, PD_ADDRESS | 0x3)
    for i in range(512):
        memory.write_u64(PD_ADDRESS + 8 * i, (i << 21) | 0x83)  # present, writable, 2 MiB
    sregs = k.get_sregs(vcpu.fd)
    sregs.gdt.base = GDT_ADDRESS
    sregs.gdt.limit = 8 * len(_GDT) - 1
    sregs.cs = _segment(CODE64_SELECTOR, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(DATA_SELECTOR, code=False))
    sregs.cr3 = PML4_ADDRESS
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_WP | CR0_PG
    sregs.efer = EFER_LME | EFER_LMA
    k.set_sregs(vcpu.fd, sregs)
    k.set_regs(vcpu.fd, s.KvmRegs(rip=rip, rsp=rsp, rsi=rsi, rflags=2))
