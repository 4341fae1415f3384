"""Completing, in userspace, guest instructions that a software KVM (kvm_pvm) refuses to emulate.

On such hosts KVM_RUN returns KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_EMULATION for a few
instructions a normal kernel executes (see shared/notes/host-kvm.md). Each handler here completes
one of them and advances RIP; anything else stays an error that stops the VM. The rest of the
list (clac, SSSE3, cmpxchg16b, xrstor) is avoided by hiding CPU features on the kernel command
line instead: COMPAT_CMDLINE.
"""

from __future__ import annotations

from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import Vcpu

INTERNAL_ERROR_EMULATION = 1
PAGE = 4096
_XSAVE_MXCSR_WORD = 24 // 4  # legacy FXSAVE region: MXCSR at byte 24
_XSAVE_XSTATE_BV_WORD = 512 // 4  # XSAVE header: XSTATE_BV at byte 512
_XFEATURE_SSE = 1 << 1
_VECTOR_BP, _VECTOR_GP = 3, 13

COMPAT_PARAMETERS = ("acpi=off", "noxsave", "nokaslr", "mitigations=off", "init_on_alloc=0")
# fsrm must go with erms: a 6.1 kernel that sees FSRM without ERMS patches the length check out
# of memmove without patching in `rep movsb`, and its copy loop then runs past short lengths
# (measured: the boot wedged at the first printk of the init task, page tables overwritten).
HIDDEN_CPU_FEATURES = (
    "smap smep fsgsbase rdpid cx16 rdrand rdseed popcnt erms fsrm avx avx2 ssse3 sse4_1 sse4_2 "
    "aes pclmulqdq sha_ni"
).split()


def compat_cmdline(cmdline: str) -> str:
    """`cmdline` plus the compatibility parameters, with one clearcpuid= holding the union of
    its features and ours (the kernel honours only one clearcpuid= option)."""
    words, hidden = [], list(HIDDEN_CPU_FEATURES)
    for word in cmdline.split():
        if word.startswith("clearcpuid="):
            hidden += [f for f in word.split("=", 1)[1].split(",") if f and f not in hidden]
        elif word not in COMPAT_PARAMETERS:
            words.append(word)
    return " ".join([*words, *COMPAT_PARAMETERS, "clearcpuid=" + ",".join(hidden)])

_GPR_ORDER = "rax rcx rdx rbx rsp rbp rsi rdi r8 r9 r10 r11 r12 r13 r14 r15".split()


class UnhandledInstruction(Exception):
    """An instruction KVM refused and vmcore cannot complete: the VM must stop."""


def _instruction_bytes(vcpu: Vcpu, memory: GuestMemory, rip: int) -> bytes:
    # Read from guest memory rather than the exit's data: kvm_pvm's copy of the instruction
    # bytes was seen to start past the instruction (measured: int3 reported as its successor).
    out = b""
    # Read page by page: the instruction may straddle a page boundary.
    address = rip
    while len(out) < 15:
        translation = k.translate(vcpu.fd, address)
        if not translation.valid:
            break
        chunk = min(15 - len(out), PAGE - address % PAGE)
        out += memory.read(translation.physical_address, chunk)
        address += chunk
    if not out:
        raise UnhandledInstruction(f"instruction at {rip:#x} is not mapped")
    return out


def _effective_address(code: bytes, at: int, rex: int, regs: s.KvmRegs) -> tuple[int, int, int]:
    """Decode a 64-bit mode ModRM memory operand at code[at]: (address, reg field, length)."""
    modrm = code[at]
    mod, reg, rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
    if mod == 3:
        raise UnhandledInstruction("register operand where memory was expected")
    length = 1
    if rm == 4:
        sib = code[at + 1]
        length += 1
        scale, index, base = sib >> 6, ((sib >> 3) & 7) | ((rex & 2) << 2), (sib & 7)
        address = 0 if index == 4 else getattr(regs, _GPR_ORDER[index]) << scale
        if base == 5 and mod == 0:
            address += int.from_bytes(code[at + 2 : at + 6], "little", signed=True)
            length += 4
        else:
            address += getattr(regs, _GPR_ORDER[base | ((rex & 1) << 3)])
    elif rm == 5 and mod == 0:
        disp = int.from_bytes(code[at + 1 : at + 5], "little", signed=True)
        return disp, reg, 5  # RIP-relative: the caller adds the next instruction's address
    else:
        address = getattr(regs, _GPR_ORDER[rm | ((rex & 1) << 3)])
    if mod == 1:
        address += int.from_bytes(code[at + length : at + length + 1], "little", signed=True)
        length += 1
    elif mod == 2:
        address += int.from_bytes(code[at + length : at + length + 4], "little", signed=True)
        length += 4
    return address & (1 << 64) - 1, reg, length


def _read_linear(vcpu: Vcpu, memory: GuestMemory, address: int, size: int) -> bytes:
    translation = k.translate(vcpu.fd, address)
    if not translation.valid or address % PAGE + size > PAGE:
        raise UnhandledInstruction(f"operand at {address:#x} not readable")
    return memory.read(translation.physical_address, size)


def _inject_exception(vcpu: Vcpu, vector: int, error_code: int | None = None) -> None:
    events = k.get_vcpu_events(vcpu.fd)
    events.exception.injected = 1
    events.exception.nr = vector
    events.exception.has_error_code = int(error_code is not None)
    events.exception.error_code = error_code or 0
    events.flags = 0
    k.set_vcpu_events(vcpu.fd, events)


def _set_mxcsr(vcpu: Vcpu, value: int) -> bool:
    """Through the XSAVE image: on kvm_pvm, KVM_GET_FPU reads MXCSR as 0 and KVM_SET_FPU's
    value did not read back (measured), while KVM_SET_XSAVE takes it once the SSE bit is set in
    XSTATE_BV (the kernel only copies MXCSR for SSE/AVX state)."""
    xsave = k.get_xsave(vcpu.fd)
    if value & ~(xsave.region[_XSAVE_MXCSR_WORD + 1] or 0xFFBF):
        _inject_exception(vcpu, _VECTOR_GP, error_code=0)  # what the CPU does for reserved bits
        return False
    xsave.region[_XSAVE_MXCSR_WORD] = value
    xsave.region[_XSAVE_XSTATE_BV_WORD] |= _XFEATURE_SSE
    k.set_xsave(vcpu.fd, xsave)
    return True


def complete_instruction(vcpu: Vcpu, memory: GuestMemory) -> str:
    """Complete the instruction KVM refused; its name. Raises UnhandledInstruction otherwise."""
    suberror, _ = vcpu.internal_error()
    if suberror != INTERNAL_ERROR_EMULATION:
        raise UnhandledInstruction(f"KVM internal error, suberror {suberror}")
    regs = k.get_regs(vcpu.fd)
    sregs = k.get_sregs(vcpu.fd)
    rip = (sregs.cs.base + regs.rip) & (1 << 64) - 1
    code = _instruction_bytes(vcpu, memory, rip)
    at = 0
    rex = 0
    while at < len(code) and code[at] in (0x66, 0xF2, 0xF3):
        at += 1
    if at < len(code) and 0x40 <= code[at] <= 0x4F:
        rex = code[at]
        at += 1
    opcode = code[at : at + 2]
    if code[at : at + 1] == b"\xcc":
        regs.rip += at + 1
        k.set_regs(vcpu.fd, regs)
        _inject_exception(vcpu, _VECTOR_BP)
        return "int3"
    if code[at : at + 1] == b"\x9b":
        regs.rip += at + 1
        k.set_regs(vcpu.fd, regs)
        return "fwait"
    if opcode == b"\x0f\xae" and at + 2 < len(code) and (code[at + 2] >> 3) & 7 == 2:
        address, _, modrm_len = _effective_address(code, at + 2, rex, regs)
        end = at + 2 + modrm_len
        if code[at + 2] >> 6 == 0 and code[at + 2] & 7 == 5:
            address = (rip + end + address) & (1 << 64) - 1
        if _set_mxcsr(vcpu, int.from_bytes(_read_linear(vcpu, memory, address, 4), "little")):
            regs.rip += end  # a fault leaves RIP on the instruction, as the CPU would
            k.set_regs(vcpu.fd, regs)
        return "ldmxcsr"
    raise UnhandledInstruction(f"cannot complete instruction {code[:8].hex()} at {rip:#x}")
