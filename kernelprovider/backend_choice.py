"""Which VM backend this host gets, and why."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from vmcore.engine import Engine
from vmcore.errors import EngineError
from vmcore.host_kvm import kvm_status

from kernelprovider import paths

BACKENDS = ("auto", "vmcore", "qemu")


@dataclass(frozen=True)
class BackendChoice:
    backend: str  # "vmcore" or "qemu"
    reason: str


def choose_backend(requested: str = "auto") -> BackendChoice:
    if requested not in BACKENDS:
        raise EngineError(f"unknown backend {requested!r}; choose one of {', '.join(BACKENDS)}")
    status = kvm_status()
    if requested == "vmcore":
        if not status.hardware_kvm:
            raise EngineError(f"the vmcore backend needs hardware KVM, and this host has none: {status.reason}")
        return BackendChoice("vmcore", f"requested; {status.reason}")
    if requested == "qemu":
        return BackendChoice("qemu", f"requested; {status.reason}")
    if status.hardware_kvm:
        return BackendChoice("vmcore", f"{status.reason}: vmcore forks VMs in about a millisecond")
    has_qemu = shutil.which("qemu-system-x86_64") is not None
    return BackendChoice(
        "qemu",
        f"{status.reason}; vmcore needs hardware KVM, so kernels run under QEMU "
        f"{'with TCG' if not status.device or not status.hardware else 'with KVM'}"
        + ("" if has_qemu else " (qemu-system-x86_64 is not installed: apt-get install qemu-system-x86)"),
    )


def create_engine(choice: BackendChoice) -> Engine:
    if choice.backend == "vmcore":
        from vmcore.kvm_engine import KvmEngine

        return KvmEngine(paths.template_root("vmcore"))
    from vmcore.qemu.engine import QemuEngine

    return QemuEngine(paths.template_root("qemu"))
