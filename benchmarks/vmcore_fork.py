"""vmcore fork benchmark (prints; not a test).

    PYTHONPATH=. python benchmarks/vmcore_fork.py [--forks 200] [--concurrent 1000] [--memory-mib 64]

Measures, on this host's /dev/kvm, with a synthetic 64-bit guest:
  * the raw ioctl costs a fork is made of (same run, same process);
  * fork latency, request -> runnable vCPU (state restored, ready for KVM_RUN), and request ->
    first guest exit, with and without the warm pool;
  * memory per fork (pages private to the fork, host RSS growth);
  * N forks alive at once: time to create them all, RSS, file descriptors.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.vmcore import synthetic  # noqa: E402
from vmcore.fork import Template, VmPool, fork  # noqa: E402
from vmcore.kvm import ioctls as k  # noqa: E402
from vmcore.kvm import kick, structs  # noqa: E402
from vmcore.kvm.memory import GuestMemory  # noqa: E402
from vmcore.kvm.snapshot import MEMORY_FILE  # noqa: E402
from vmcore.kvm.vm import Kvm, Vm  # noqa: E402


def ms(values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"p50 {p50 * 1e3:7.3f} ms  p99 {p99 * 1e3:7.3f} ms  (n={len(values)})"


def timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def raw_costs(template: Template, repeat: int) -> None:
    print("raw ioctl costs")
    kvm = Kvm.shared()
    vms: list[int] = []

    def create_vm() -> None:
        fd = k.create_vm(kvm.fd)
        k.set_tss_addr(fd, 0xFFFBD000)
        k.create_irqchip(fd)
        k.create_pit2(fd)
        vms.append(fd)

    print(f"  KVM_CREATE_VM+TSS+IRQCHIP+PIT2     {ms(timed(create_vm, repeat))}")
    vcpus = []
    it = iter(vms)

    def create_vcpu() -> None:
        fd = k.create_vcpu(next(it), 0)
        k.set_cpuid2(fd, kvm.supported_cpuid)
        vcpus.append(fd)

    print(f"  KVM_CREATE_VCPU+SET_CPUID2         {ms(timed(create_vcpu, repeat))}")
    maps: list[GuestMemory] = []
    def map_memory() -> None:
        maps.append(GuestMemory.copy_on_write(template.path / MEMORY_FILE, template.memory_size))

    print(f"  mmap MAP_PRIVATE of snapshot RAM   {ms(timed(map_memory, repeat))}")
    pairs = iter(zip(vms, maps))

    def set_region() -> None:
        vm_fd, memory = next(pairs)
        k.set_user_memory_region(vm_fd, structs.KvmUserspaceMemoryRegion(
            slot=0, guest_phys_addr=0, memory_size=memory.size, userspace_addr=memory.host_address))

    print(f"  KVM_SET_USER_MEMORY_REGION {template.memory_size >> 20:4d} MiB {ms(timed(set_region, repeat))}")
    vm = Vm()
    print(f"  vCPU state restore (all ioctls)    {ms(timed(lambda: template.vcpus[0].restore(vm.vcpus[0]), repeat))}")
    print(f"  VM state restore (irqchip,PIT,clk) {ms(timed(lambda: template.vm.restore(vm), repeat))}")
    vm.close()
    for fd in vcpus + vms:
        os.close(fd)
    for memory in maps:
        memory.close()


def fork_latency(template: Template, forks: int, pool: VmPool | None) -> None:
    label = "with warm pool   " if pool else "without pool     "
    to_runnable, to_exit, private = [], [], []
    for _ in range(forks):
        if pool is not None:
            pool.wait_full(5)  # requests spaced out: the pool is refilled between them
        start = time.perf_counter()
        machine = fork(template, pool)
        runnable = time.perf_counter()
        synthetic.attach_report_port(machine)
        synthetic.run_reports(machine, 1)
        done = time.perf_counter()
        to_runnable.append(runnable - start)
        to_exit.append(done - start)
        private.append(machine.private_memory_bytes())
        machine.kill()
    print(f"fork {label} request->runnable vCPU {ms(to_runnable)}")
    print(f"fork {label} request->first exit    {ms(to_exit)}")
    print(f"  private memory per fork after its first guest write: "
          f"{statistics.median(private) / 1024:.0f} KiB (median)")


def rss_kib() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4


def concurrent(template: Template, count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * count + 256)), hard))
    pool = VmPool(min(count, 64))
    pool.wait_full(30)
    rss0, fds0 = rss_kib(), len(os.listdir("/proc/self/fd"))
    machines = []
    start = time.perf_counter()
    for _ in range(count):
        machine = fork(template, pool)
        synthetic.attach_report_port(machine)
        synthetic.run_reports(machine, 1)
        machines.append(machine)
    elapsed = time.perf_counter() - start
    rss1, fds1 = rss_kib(), len(os.listdir("/proc/self/fd"))
    private = sum(m.private_memory_bytes() for m in machines[:50]) / 50
    print(f"{count} concurrent forks (each ran to its first exit): {elapsed:.2f} s total, "
          f"{elapsed / count * 1e3:.2f} ms each; host RSS +{(rss1 - rss0) / count:.0f} KiB/fork; "
          f"fds +{(fds1 - fds0) / count:.1f}/fork; private guest memory {private / 1024:.0f} KiB/fork")
    start = time.perf_counter()
    for machine in machines:
        machine.kill()
    print(f"  destroying them: {time.perf_counter() - start:.2f} s")
    pool.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--forks", type=int, default=200)
    parser.add_argument("--concurrent", type=int, default=1000)
    parser.add_argument("--memory-mib", type=int, default=64)
    args = parser.parse_args()
    kick.install()
    with tempfile.TemporaryDirectory() as directory:
        template = Template.load(synthetic.make_snapshot(Path(directory) / "snap", memory_mib=args.memory_mib))
        print(f"synthetic template: {args.memory_mib} MiB guest RAM, 1 vCPU, host {os.uname().release}")
        raw_costs(template, min(args.forks, 100))
        fork_latency(template, args.forks, None)
        pool = VmPool(8)
        pool.wait_full(30)
        fork_latency(template, args.forks, pool)
        pool.close()
        concurrent(template, args.concurrent)


if __name__ == "__main__":
    main()
