"""Instructions a software KVM refuses, completed by vmcore in userspace (vmcore.compat)."""

from __future__ import annotations

import pytest

from tests.vmcore import synthetic
from vmcore.kvm import ioctls as k
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import Vm
from vmcore.kvm_engine import hardware_kvm_status
from vmcore.microvm import MicroVm
from vmcore import x86_setup

pytestmark = pytest.mark.usefixtures("kvm_available")
MXCSR_VALUE = 0x1FA0
# fwait; ldmxcsr [0x2100]; ldmxcsr [rip+0x3000 - next]; out 0x10, al; jmp $
CODE = bytes.fromhex("9b" "0fae142500210000" "0fae15f22f0000" "e610" "ebfe")


def test_fwait_and_ldmxcsr_complete():
    memory = GuestMemory.anonymous(4 << 20)
    memory.write(synthetic.CODE, CODE)
    memory.write_u32(0x2100, 0x1F80)
    memory.write_u32(synthetic.CODE + 16 + 0x2FF2, MXCSR_VALUE)  # the RIP-relative operand
    machine = MicroVm(Vm(), memory, name="compat")
    port = synthetic.attach_report_port(machine)
    x86_setup.enter_long_mode(machine.vcpu, memory, synthetic.CODE, rsp=synthetic.CODE)
    synthetic.run_reports(machine, 1)
    assert port.values
    assert k.get_xsave(machine.vcpu.fd).region[6] == MXCSR_VALUE  # MXCSR in the XSAVE image
    if not hardware_kvm_status()[0]:
        # On kvm_pvm these exits are what compat exists for; hardware KVM runs them natively.
        assert machine.completions["fwait"] == 1 and machine.completions["ldmxcsr"] == 2
    machine.kill()


def test_unknown_refused_instruction_stops_only_that_vm():
    memory = GuestMemory.anonymous(4 << 20)
    memory.write(synthetic.CODE, bytes.fromhex("0f01ca" "e610" "ebfe"))  # clac, then a report
    machine = MicroVm(Vm(), memory, name="refused")
    synthetic.attach_report_port(machine)
    x86_setup.enter_long_mode(machine.vcpu, memory, synthetic.CODE, rsp=synthetic.CODE)
    for _ in range(10):
        machine.run_once()
        if machine.exit_status is not None:
            break
    if hardware_kvm_status()[0]:
        pytest.skip("hardware KVM executes clac itself")
    assert machine.exit_status == 1 and "cannot complete" in machine.exit_reason
    machine.kill()
