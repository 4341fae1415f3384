"""What kind of KVM this host offers; decides which backend and which QEMU accelerator run."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KvmStatus:
    device: bool  # /dev/kvm opens read-write
    hardware: bool  # the CPU exposes VT-x or AMD-V to this host
    module: str  # kvm_intel, kvm_amd, kvm_pvm, or "" when none is loaded
    reason: str

    @property
    def hardware_kvm(self) -> bool:
        return self.device and self.hardware and self.module in ("kvm_intel", "kvm_amd")


def kvm_status(cpuinfo: Path = Path("/proc/cpuinfo"), modules: Path = Path("/sys/module")) -> KvmStatus:
    device = os.access("/dev/kvm", os.R_OK | os.W_OK)
    flags = set(re.findall(r"\b(vmx|svm)\b", cpuinfo.read_text())) if cpuinfo.exists() else set()
    loaded = [m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if (modules / m).exists()]
    module = loaded[0] if loaded else ""
    if not device:
        reason = "/dev/kvm is missing or not accessible: no KVM"
    elif module == "kvm_pvm" or not flags:
        reason = (
            f"{module or 'KVM'} is software virtualization (no vmx/svm in /proc/cpuinfo): guest kernel "
            "code is emulated and guest user programs cannot make system calls"
        )
    else:
        reason = f"hardware KVM ({module}, {'/'.join(sorted(flags))})"
    return KvmStatus(device=device, hardware=bool(flags), module=module, reason=reason)
