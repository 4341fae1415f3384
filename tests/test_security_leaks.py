"""Issue 7, item 9: launch/shutdown cycles leave nothing behind in the daemon.

After a warm-up (pool full, first-use allocations done), FORKVM_LEAK_CYCLES cycles (default
200) of KernelManager.start_kernel -> kernel_info -> shutdown_kernel must leave the daemon's
fd count, child processes, RSS and the disk it uses in the cache within 5% of the baseline.
The 1,000-cycle version with figures is benchmarks/leak_cycles.py.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.leak_cycles import cycle, steady, within
from tests.security_support import env_int, private_daemon

pytestmark = [pytest.mark.slow]

CYCLES = env_int("FORKVM_LEAK_CYCLES", 200)
WARM_UP = env_int("FORKVM_LEAK_WARM_UP", 5)


@pytest.mark.timeout(5400)
def test_launch_shutdown_cycles_leak_nothing(tmp_path: Path, forkvm_template: str, artifacts_dir: Path) -> None:
    # A daemon of its own: nothing else launches kernels beside the cycles.
    with private_daemon(tmp_path / "runtime") as pid:
        for _ in range(WARM_UP):
            cycle(forkvm_template)
        before = steady(pid, forkvm_template)
        started = time.monotonic()
        for _ in range(CYCLES):
            cycle(forkvm_template)
        elapsed = time.monotonic() - started
        after = steady(pid, forkvm_template)
        report = f"{CYCLES} cycles in {elapsed:.0f} s\nbefore {before.line()}\nafter  {after.line()}"
        print(report)
        (artifacts_dir / "leak_cycles.txt").write_text(report + "\n")
        assert within(before.fds, after.fds), report
        assert after.children == before.children, report
        assert within(before.rss_bytes, after.rss_bytes), report
        assert within(before.cache_bytes, after.cache_bytes), report
        assert after.tmp_entries <= before.tmp_entries, report
