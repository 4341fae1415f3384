"""Kernel parameters every forkvm guest boots with, whichever backend runs it."""

from __future__ import annotations

# CPU features the guest kernel must not use: on the kvm_pvm hosts the kernel runs in KVM's
# instruction emulator, which rejects these instructions (see shared/notes/host-kvm.md). User
# space still sees the real CPUID, so numpy's SIMD dispatch is unaffected. Harmless elsewhere.
# fsrm goes with erms: with FSRM but not ERMS, Linux 6.1's memmove drops its short-copy check
# and overruns (found booting under vmcore: a printk memmove overwrote the page tables).
_HIDDEN_CPU_FEATURES = (
    "smap,smep,fsgsbase,rdpid,cx16,rdrand,rdseed,popcnt,erms,fsrm,avx,avx2,"
    "ssse3,sse4_1,sse4_2,aes,pclmulqdq,sha_ni"
)

BASE_CMDLINE = " ".join(
    [
        "console=ttyS0",
        # A dead guest (PID 1 exited, oops) reboots at once, which ends the VM (next line).
        "panic=-1",
        # Reboot by triple fault: it needs no device (microvm has no keyboard controller, no
        # ACPI, no port 0xcf9), and both QEMU -no-reboot and a KVM VMM see it as the VM ending.
        "reboot=t",
        # Forks share the template's memory image; a randomised layout buys nothing there.
        "nokaslr",
        "noxsave",
        "mitigations=off",
        "init_on_alloc=0",
        # Trust the TSC instead of watching it against another clock source (costly emulated).
        "tsc=reliable",
        f"clearcpuid={_HIDDEN_CPU_FEATURES}",
    ]
)
"""Backends append their device parameters (virtio_mmio.device=..., init=...)."""
