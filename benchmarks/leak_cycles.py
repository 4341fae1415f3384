"""Leak benchmark: 1,000 launch/shutdown cycles through jupyter_client (prints; not a test).

    python benchmarks/leak_cycles.py [--cycles 1000] [--every 100] [--template default]

Starts a private forkvm daemon (its own runtime dir; the template cache is shared), runs a
warm-up, then cycles KernelManager.start_kernel -> kernel_info -> shutdown_kernel and prints
the daemon's fd count, child processes, RSS, cache disk usage and temp entries every --every
cycles (each measured with the warm pool full again), plus cycle latency percentiles.
tests/test_security_leaks.py runs the same cycles (200 by default) with a 5% bound.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernelprovider.daemon_client import call_sync  # noqa: E402
from tests.leak_cycles import cycle, steady  # noqa: E402
from tests.security_support import private_daemon  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--warm-up", type=int, default=5)
    parser.add_argument("--template", default="default")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="forkvm-leak-bench-") as runtime, private_daemon(Path(runtime)) as pid:
        call_sync("template_build", name=args.template)
        for _ in range(args.warm_up):
            cycle(args.template)
        baseline = steady(pid, args.template)
        print(f"daemon {pid}, template {args.template}, {args.cycles} cycles", flush=True)
        print(f"{'cycle':>6}  {baseline.line()}", flush=True)
        latencies: list[float] = []
        for index in range(1, args.cycles + 1):
            started = time.monotonic()
            cycle(args.template)
            latencies.append(time.monotonic() - started)
            if index % args.every == 0 or index == args.cycles:
                figures = steady(pid, args.template)
                print(f"{index:6d}  {figures.line()}", flush=True)
        final = steady(pid, args.template)
        ordered = sorted(latencies)
        print(
            f"cycle latency p50 {statistics.median(ordered):.2f} s  p99 {ordered[int(len(ordered) * 0.99) - 1]:.2f} s  "
            f"total {sum(latencies):.0f} s",
            flush=True,
        )
        for name in ("fds", "children", "rss_bytes", "cache_bytes", "tmp_entries"):
            first, last = getattr(baseline, name), getattr(final, name)
            change = (last - first) / first * 100 if first else 0.0
            print(f"{name:12s} {first:>14d} -> {last:>14d}  ({change:+.1f}%)", flush=True)


if __name__ == "__main__":
    main()
