"""Synthetic guests: a few bytes of machine code, and the VMs and snapshots that run them."""

from __future__ import annotations

from pathlib import Path

from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import EXIT_IO, Vm
from vmcore.microvm import MicroVm
from vmcore import x86_setup

COUNTER = 0x2000
REPORT_PORT = 0x10
CODE = 0x100000

# 64-bit, CPL 0: loop { inc qword [COUNTER]; mov al, [COUNTER]; out REPORT_PORT, al }
LONG_MODE_LOOP = bytes.fromhex("48FF042500200000" "8A042500200000" "E610" "EBED")
# 16-bit real mode at 0x1000: loop { inc byte [COUNTER]; out REPORT_PORT, al }
REAL_MODE_LOOP = bytes.fromhex("A00020FEC0A20020E610EBF4")


class ReportPort:
    """Port device recording what the guest wrote."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.values.append(int.from_bytes(data, "little"))


def attach_report_port(machine: MicroVm) -> ReportPort:
    port = ReportPort()
    machine.pio.register(REPORT_PORT, 1, port)
    return port


def long_mode_vm(memory_mib: int = 4) -> MicroVm:
    memory = GuestMemory.anonymous(memory_mib << 20)
    memory.write(CODE, LONG_MODE_LOOP)
    machine = MicroVm(Vm(), memory, name="synthetic")
    x86_setup.enter_long_mode(machine.vcpu, memory, CODE, rsp=CODE)
    return machine


def real_mode_vm(memory_mib: int = 1) -> MicroVm:
    memory = GuestMemory.anonymous(memory_mib << 20)
    memory.write(0x1000, REAL_MODE_LOOP)
    machine = MicroVm(Vm(), memory, name="synthetic-real")
    x86_setup.enter_real_mode(machine.vcpu, 0x1000)
    return machine


def run_reports(machine: MicroVm, count: int) -> None:
    """Run until the guest has done `count` port writes."""
    done = 0
    while done < count:
        reason = machine.run_once()
        assert machine.exit_status is None, machine.exit_reason
        if reason == EXIT_IO:
            done += 1


def make_snapshot(directory: Path, steps: int = 3, memory_mib: int = 4) -> Path:
    machine = long_mode_vm(memory_mib)
    attach_report_port(machine)
    run_reports(machine, steps)
    machine.snapshot(directory)
    machine.kill()
    return directory
