"""Kernel launch latency and idle memory of forkvm kernels (prints figures; not a test).

    python benchmarks/fork_latency.py [--samples 20] [--max-kernels 20] [--template default]

In one run, measures launch -> first kernel_info_reply for
  (a) a pool hit, members held resumed (the daemon's default, pool_hold=resumed);
  (b) a pool hit, members held paused (pool_hold=paused: the launch pays the resume);
  (c) a pool miss (pool_size=0: restore + resume on the launch path);
  (d) a local ipykernel started by jupyter_client's default provisioner (kernel "python3");
with p50/p99 of each and its ratio to (d). Then it launches up to --max-kernels idle forks,
reads each one's private memory (Private_Dirty of its QEMU process, from the daemon's `list`)
and extrapolates how many idle forks fit in 16 GiB.

Each configuration runs its own daemon (`python -m kernelprovider.cli daemon run ...`) in a
temporary FORKVM_RUNTIME_DIR; templates come from the shared cache (built when missing).
For a pool hit, the benchmark waits until the pool is full before each launch.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from jupyter_client.blocking import BlockingKernelClient
from jupyter_client.manager import KernelManager

from kernelprovider.daemon_client import DaemonClient, daemon_running

GiB = 1 << 30
MiB = 1 << 20
BUDGET_BYTES = 16 * GiB


def call(socket_path: Path, method: str, **params: Any) -> Any:
    return asyncio.run(DaemonClient(socket_path, autostart=False).call(method, **params))


@contextmanager
def daemon(*options: str) -> Iterator[Path]:
    runtime = Path(tempfile.mkdtemp(prefix="forkvm-bench-"))
    runtime.chmod(0o700)
    socket_path = runtime / "daemon.sock"
    env = {**os.environ, "FORKVM_RUNTIME_DIR": str(runtime)}
    log = open(runtime / "daemon.log", "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "kernelprovider.cli", "daemon", "run", *options],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not daemon_running(socket_path):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(runtime / 'daemon.log').read_text()[-2000:]}")
            time.sleep(0.05)
        yield socket_path
    finally:
        if process.poll() is None:
            try:
                call(socket_path, "stop")
                process.wait(60)
            except Exception:
                process.kill()
                process.wait()
        log.close()
        shutil.rmtree(runtime, ignore_errors=True)


def connect(info: dict[str, Any]) -> BlockingKernelClient:
    client = BlockingKernelClient(ip=info["ip"], **{k: v for k, v in info.items() if k.endswith("_port")})
    client.session.signature_scheme = info["signature_scheme"]
    client.session.key = info["key"].encode()
    client.start_channels(hb=False)
    return client


def first_reply_s(started: float, client: BlockingKernelClient, timeout: float = 300.0) -> float:
    reply = client.kernel_info(reply=True, timeout=timeout)
    elapsed = time.monotonic() - started
    assert reply["content"]["status"] == "ok", reply["content"]
    return elapsed


def wait_pool(socket_path: Path, template: str, size: int, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while call(socket_path, "status")["pools"].get(template, {}).get("ready", 0) < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"pool of {template} did not fill to {size}")
        time.sleep(0.2)


def forkvm_samples(socket_path: Path, template: str, samples: int, pool_size: int) -> tuple[list[float], list[float]]:
    """(launch -> first kernel_info_reply, the daemon's own launch_s) per sample."""
    totals, daemon_side = [], []
    if pool_size:  # make the pool exist (the first launch of a template is always a miss)
        first = call(socket_path, "launch", template=template, pool_size=pool_size)
        call(socket_path, "release", kernel_id=first["kernel_id"])
    for _ in range(samples):
        if pool_size:
            wait_pool(socket_path, template, pool_size)
        started = time.monotonic()
        result = call(socket_path, "launch", template=template, pool_size=pool_size)
        client = connect(result["connection_info"])
        try:
            totals.append(first_reply_s(started, client))
        finally:
            client.stop_channels()
        daemon_side.append(result["launch_s"])
        call(socket_path, "release", kernel_id=result["kernel_id"])
    return totals, daemon_side


def local_ipykernel_samples(samples: int) -> list[float]:
    totals = []
    for _ in range(samples):
        started = time.monotonic()
        manager = KernelManager(kernel_name="python3")
        manager.start_kernel(stderr=subprocess.DEVNULL)  # its "TCP without encryption" warning
        client = manager.client()
        client.start_channels()
        try:
            totals.append(first_reply_s(started, client))
        finally:
            client.stop_channels()
            manager.shutdown_kernel(now=True)
    return totals


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def memory_figures(socket_path: Path, template: str, max_kernels: int) -> None:
    available_before = meminfo("MemAvailable")
    kernels = []
    try:
        for index in range(max_kernels):
            result = call(socket_path, "launch", template=template, pool_size=0)
            kernels.append(result["kernel_id"])
            client = connect(result["connection_info"])
            try:
                first_reply_s(time.monotonic(), client)
            finally:
                client.stop_channels()
        time.sleep(5)  # idle
        listing = call(socket_path, "list")
        private = [k["private_memory_bytes"] for k in listing if k["status"] is None]
        available_after = meminfo("MemAvailable")
    finally:
        for kernel_id in kernels:
            try:
                call(socket_path, "release", kernel_id=kernel_id)
            except Exception:
                pass
    templates = {t["name"]: t for t in call(socket_path, "template_list")}
    shared = templates[template]["size_bytes"]  # the RAM file's pages on disk: page cache shared by all forks
    mean = statistics.mean(private)
    per_kernel_host = (available_before - available_after) / len(private)
    fit = int((BUDGET_BYTES - shared) // mean)
    print(f"\nidle forks measured: {len(private)} (launched with pool_size=0, one kernel_info each, then 5 s idle)")
    print(f"  private memory per idle fork (Private_Dirty of its QEMU): mean {mean / MiB:.1f} MiB, "
          f"min {min(private) / MiB:.1f}, max {max(private) / MiB:.1f} MiB")  # fmt: skip
    print(f"  host MemAvailable dropped by {(available_before - available_after) / MiB:.0f} MiB in all, "
          f"{per_kernel_host / MiB:.1f} MiB per fork (noisy: other work runs on this host)")  # fmt: skip
    print(f"  template RAM file shared by every fork: {shared / MiB:.0f} MiB on disk (page cache, counted once)")
    print(f"  idle forks in 16 GiB: about {fit} -- EXTRAPOLATED from {len(private)} measured forks as "
          f"(16 GiB - shared template) / mean private memory; not measured up to that count")  # fmt: skip


def meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--max-kernels", type=int, default=20, choices=range(1, 51), metavar="N (1-50)")
    parser.add_argument("--template", default="default")
    parser.add_argument("--pool-size", type=int, default=2)
    args = parser.parse_args()

    load = os.getloadavg()
    print(f"forkvm launch latency; {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} "
          "at start (other work on this host skews every figure)")  # fmt: skip
    results: dict[str, list[float]] = {}
    daemon_side: dict[str, list[float]] = {}
    configurations = [
        ("(a) pool hit, hold=resumed", args.pool_size, "resumed"),
        ("(b) pool hit, hold=paused", args.pool_size, "paused"),
        ("(c) pool miss (pool_size=0)", 0, "resumed"),
    ]
    for label, pool_size, hold in configurations:
        with daemon(f"--ForkvmDaemon.pool_size={pool_size}", f"--ForkvmDaemon.pool_hold={hold}") as socket_path:
            built = call(socket_path, "template_build", name=args.template)
            if not built["up_to_date"]:
                print(f"built template {args.template}")
            results[label], daemon_side[label] = forkvm_samples(socket_path, args.template, args.samples, pool_size)
            print(f"{label}: done", flush=True)
    label_d = "(d) local ipykernel (python3)"
    results[label_d] = local_ipykernel_samples(args.samples)
    print(f"{label_d}: done", flush=True)

    base = statistics.median(results[label_d])
    base99 = percentile(results[label_d], 0.99)
    print(f"\nlaunch -> first kernel_info_reply, {args.samples} samples each "
          f"(p99 of {args.samples} samples is their maximum)")  # fmt: skip
    for label, values in results.items():
        p50, p99 = statistics.median(values), percentile(values, 0.99)
        extra = ""
        if label in daemon_side:
            extra = f"  [daemon launch_s p50 {statistics.median(daemon_side[label]) * 1e3:7.1f} ms]"
        print(f"  {label:32s} p50 {p50 * 1e3:8.1f} ms  p99 {p99 * 1e3:8.1f} ms  "
              f"ratio to (d): p50 {p50 / base:5.2f}x  p99 {p99 / base99:5.2f}x{extra}")  # fmt: skip
    with daemon("--ForkvmDaemon.pool_size=0") as socket_path:
        memory_figures(socket_path, args.template, args.max_kernels)
    load = os.getloadavg()
    print(f"load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
