"""Launch/shutdown cycles through jupyter_client and the daemon's resource figures around them.

Shared by tests/test_security_leaks.py (CI: FORKVM_LEAK_CYCLES, default 200) and
benchmarks/leak_cycles.py (1,000 cycles, prints figures). Nothing is mocked: every cycle is
KernelManager.start_kernel -> kernel_info over real ZMQ -> shutdown_kernel of a real fork.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kernelprovider import paths
from tests.security_support import KERNEL_START_TIMEOUT_S, kernel_manager, pool_settled


@dataclass(frozen=True)
class Figures:
    fds: int  # open file descriptors of the daemon
    children: int  # processes whose parent is the daemon (QEMU of kernels and warm forks)
    rss_bytes: int  # the daemon's resident set
    cache_bytes: int  # disk used under the cache dir by what this daemon may write (see cache_usage)
    tmp_entries: int  # forkvm-* entries in the temp dir (branch sockets and the like)

    def line(self) -> str:
        return (
            f"fds {self.fds:5d}  children {self.children:3d}  rss {self.rss_bytes / 2**20:8.1f} MiB  "
            f"cache {self.cache_bytes / 2**20:10.1f} MiB  tmp {self.tmp_entries}"
        )


def _blocks(path: Path) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def cache_usage(template: str) -> int:
    """Disk used under the cache dir, leaving out what other processes build beside us.

    Guest kernels, initramfs images and templates other than `template` are content-keyed
    build products that other users of the shared cache may add at any time; the daemon under
    test writes none of them while cycling. Everything else counts, including stray files.
    """
    root = paths.cache_dir()
    total = 0
    for entry in root.iterdir():
        if entry.name in ("kernel", "initramfs"):
            continue
        if entry.name == "templates":
            for backend in entry.iterdir():
                for item in backend.iterdir():
                    if item.name == template:
                        total += _blocks(item)
            continue
        total += _blocks(entry) if entry.is_dir() else entry.lstat().st_blocks * 512
    return total


def measure(daemon_pid: int, template: str) -> Figures:
    out = subprocess.run(["pgrep", "-P", str(daemon_pid)], capture_output=True, text=True).stdout
    rss = 0
    for line in Path(f"/proc/{daemon_pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    return Figures(
        fds=len(os.listdir(f"/proc/{daemon_pid}/fd")),
        children=len(out.split()),
        rss_bytes=rss,
        cache_bytes=cache_usage(template),
        tmp_entries=sum(1 for p in tmp.glob("forkvm-*") if p.stat().st_uid == os.getuid()),
    )


def cycle(template: str) -> None:
    """One launch -> kernel_info -> shutdown through jupyter_client."""
    km = kernel_manager(template)
    km.start_kernel()
    try:
        kc = km.client()
        kc.start_channels(hb=False)
        try:
            reply = kc.kernel_info(reply=True, timeout=KERNEL_START_TIMEOUT_S)
            assert reply["content"]["status"] == "ok"
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=True)
    km.cleanup_resources()


def steady(daemon_pid: int, template: str, settle_s: float = 3.0) -> Figures:
    """Figures once the warm pool is full again and nothing is in flight."""
    assert pool_settled(template), "the warm pool did not refill"
    time.sleep(settle_s)
    return measure(daemon_pid, template)


def within(before: float, after: float, tolerance: float = 0.05) -> bool:
    return after <= before * (1 + tolerance) and after >= before * (1 - tolerance)
