"""Forks of synthetic guests on real /dev/kvm: isolation, state round trips, resource cleanup."""

from __future__ import annotations

import os
import time

import pytest

from tests.vmcore import synthetic
from vmcore.fork import Template, VmPool, fork
from vmcore.kvm.snapshot import MEMORY_FILE, SnapshotError, SnapshotState, STATE_FILE
from vmcore.kvm.vcpu_state import VcpuState

pytestmark = pytest.mark.usefixtures("kvm_available")
MSR_IA32_TSC = 0x10


@pytest.fixture
def template(tmp_path):
    return Template.load(synthetic.make_snapshot(tmp_path / "snap", steps=3, memory_mib=8))


def counter(machine) -> int:
    return machine.memory.read_u64(synthetic.COUNTER)


def test_real_mode_guest_runs():
    machine = synthetic.real_mode_vm()
    port = synthetic.attach_report_port(machine)
    synthetic.run_reports(machine, 5)
    assert port.values == [1, 2, 3, 4, 5]
    machine.kill()


def test_fork_resumes_where_snapshot_stopped(template):
    machine = fork(template)
    port = synthetic.attach_report_port(machine)
    assert counter(machine) == 3
    synthetic.run_reports(machine, 2)
    assert port.values == [4, 5]
    machine.kill()


def test_write_in_fork_invisible_to_siblings_and_snapshot(template):
    forks = [fork(template, name=f"f{i}") for i in range(3)]
    for machine in forks:
        synthetic.attach_report_port(machine)
    synthetic.run_reports(forks[0], 10)
    forks[1].memory.write(0x3000, b"mine")
    assert counter(forks[0]) == 13
    assert counter(forks[1]) == 3 and counter(forks[2]) == 3
    assert forks[0].memory.read(0x3000, 4) == bytes(4)
    assert forks[2].memory.read(0x3000, 4) == bytes(4)
    with open(template.path / MEMORY_FILE, "rb") as snapshot_memory:
        snapshot_memory.seek(synthetic.COUNTER)
        assert int.from_bytes(snapshot_memory.read(8), "little") == 3
    # Only what a fork touched is private to it. kvm_pvm measured here makes the whole 2 MiB
    # guest large page holding the written data private on the first guest write.
    assert 0 < forks[0].private_memory_bytes() <= (2 << 20) + 4 * 4096
    assert forks[0].private_memory_bytes() < forks[0].memory.size
    for machine in forks:
        machine.kill()


def _state_without_tsc(state: VcpuState) -> bytes:
    for entry in state.msrs.entries:
        if entry.index == MSR_IA32_TSC:
            entry.data = 0  # the TSC keeps counting between capture and restore
    return state.to_bytes()


def test_vcpu_state_round_trips_bit_exact(template):
    machine = fork(template)
    synthetic.attach_report_port(machine)
    synthetic.run_reports(machine, 4)
    machine.pause()
    before = VcpuState.capture(machine.vcpu, machine.vm.kvm)
    other = fork(template)
    VcpuState.from_bytes(before.to_bytes()).restore(other.vcpu)
    after = VcpuState.capture(other.vcpu, other.vm.kvm)
    assert _state_without_tsc(after) == _state_without_tsc(before)
    assert after.regs.rip == before.regs.rip
    machine.kill()
    other.kill()


def test_fork_of_a_fork(template, tmp_path):
    first = fork(template)
    synthetic.attach_report_port(first)
    synthetic.run_reports(first, 4)  # counter 7
    first.snapshot(tmp_path / "child")
    child_template = Template.load(tmp_path / "child")
    grandchild = fork(child_template)
    port = synthetic.attach_report_port(grandchild)
    synthetic.run_reports(grandchild, 1)
    assert port.values == [8]
    assert counter(first) == 7  # the parent is untouched by the grandchild
    synthetic.run_reports(first, 1)
    assert counter(first) == 8 and counter(grandchild) == 8
    first.kill()
    grandchild.kill()


def test_fork_from_warm_pool(template):
    pool = VmPool(4)
    try:
        assert pool.wait_full(10)
        machines = [fork(template, pool) for _ in range(6)]  # more than the pool holds
        for machine in machines:
            port = synthetic.attach_report_port(machine)
            synthetic.run_reports(machine, 1)
            assert port.values == [4]
            machine.kill()
    finally:
        pool.close()


def test_threaded_run_pause_and_resume(template):
    machine = fork(template)
    synthetic.attach_report_port(machine)
    machine.start()
    time.sleep(0.05)
    machine.pause()
    value = counter(machine)
    assert value > 3
    time.sleep(0.02)
    assert counter(machine) == value
    machine.start()
    time.sleep(0.05)
    machine.kill()
    assert machine.exit_status == -9


def test_corrupt_state_file_refused(template):
    path = template.path / STATE_FILE
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(SnapshotError, match="checksum"):
        Template.load(template.path)
    with pytest.raises(SnapshotError, match="not a vmcore snapshot"):
        SnapshotState.decode(b"X" * 64)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4


@pytest.mark.slow
def test_thousand_fork_destroy_cycles_leak_nothing(template):
    pool = VmPool(2)
    try:
        for _ in range(50):  # warm up allocator and caches before measuring
            machine = fork(template, pool)
            machine.kill()
        assert pool.wait_full(10)  # count fds while the pool is not creating a VM
        fds, rss = _open_fds(), _rss_kib()
        for i in range(1000):
            machine = fork(template, pool)
            if i % 100 == 0:
                synthetic.attach_report_port(machine)
                synthetic.run_reports(machine, 1)
            machine.kill()
        assert pool.wait_full(10)
        assert _open_fds() == fds
        assert _rss_kib() - rss < 8 * 1024, "RSS grew by more than 8 MiB over 1,000 forks"
    finally:
        pool.close()
