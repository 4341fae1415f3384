"""Issue 7, item 5: per-kernel limits: guest RAM, CPU time, wall time, kernels per user.

A kernel's memory is its template's guest RAM: a cell that allocates past it meets the
guest's OOM killer, which ends that kernel only. CPU- and wall-time limits and max_kernels
are daemon settings (`--ForkvmDaemon.cpu_time_limit_s` etc.), so those tests run their own
daemon with the setting (see security_support.private_daemon).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyter_client import AsyncKernelManager
from traitlets.config import Config

from kernelprovider.daemon_client import DaemonError, call_sync
from tests.security_support import (
    assert_usable,
    client,
    evaluate,
    forkvm_kernel,
    kernel_manager,
    private_daemon,
    wait_until,
)

pytestmark = [pytest.mark.slow]

SMALL_TEMPLATE = "small"
SMALL_MIB = 512
MEMTOTAL_KIB = "int(open('/proc/meminfo').readline().split()[1])"
# Touches every page it allocates (numpy.ones writes them), 32 MiB at a time, until it dies.
MEMORY_HOG = """
import numpy
_hog = []
while True:
    _hog.append(numpy.ones(32 * 1024 * 1024 // 8))
"""


def _dead_within(km, seconds: float) -> float | None:  # type: ignore[no-untyped-def]
    """Seconds until km.is_alive() turned False, or None if it did not within `seconds`."""
    started = time.monotonic()
    if wait_until(lambda: not km.is_alive(), seconds, interval=0.1):
        return time.monotonic() - started
    return None


@pytest.mark.timeout(1800)
def test_memory_is_template_ram_and_oom_kills_only_that_kernel(forkvm_template: str) -> None:
    result = call_sync("template_build", name=SMALL_TEMPLATE, memory_mib=SMALL_MIB)
    assert result["memory_mib"] == SMALL_MIB
    with forkvm_kernel(SMALL_TEMPLATE) as (km, kc), forkvm_kernel(forkvm_template) as (_, other):
        memtotal = evaluate(kc, "", MEMTOTAL_KIB)
        assert 0.75 * SMALL_MIB * 1024 < memtotal <= SMALL_MIB * 1024, memtotal
        assert evaluate(other, "", MEMTOTAL_KIB) > SMALL_MIB * 1024
        kc.execute(MEMORY_HOG)
        # The hog fills ~500 MiB under emulation first; then death must be noticed promptly.
        died_after = _dead_within(km, 300)
        assert died_after is not None, "the kernel survived allocating past its guest RAM"
        # The provisioner's own view, as Jupyter polls it.
        assert asyncio.run(km.provisioner.poll()) is not None
        # The other kernel never noticed.
        assert_usable(other)
        # The dead one restarts as a fresh fork of the same template.
        kc.stop_channels()
        km.restart_kernel(now=True)
        kc2 = client(km)
        try:
            assert evaluate(kc2, "", MEMTOTAL_KIB) == memtotal
            assert evaluate(kc2, "", "'_hog' in globals()") is False
        finally:
            kc2.stop_channels()


@pytest.fixture(scope="module")
def limits_daemon(tmp_path_factory: pytest.TempPathFactory, forkvm_template: str) -> Iterator[int]:
    runtime = tmp_path_factory.mktemp("limits-daemon")
    with private_daemon(
        runtime, "--ForkvmDaemon.cpu_time_limit_s=3", "--ForkvmDaemon.max_kernels=2"
    ) as pid:  # fmt: skip
        yield pid


@pytest.mark.timeout(900)
def test_cpu_time_limit_ends_a_busy_kernel(limits_daemon: int, forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (km, kc):
        assert_usable(kc)
        started = time.monotonic()
        kc.execute("while True:\n    pass\n")
        died_after = _dead_within(km, 120)
        assert died_after is not None, "a busy loop outlived a 3 s CPU-time limit"
        # Soft limit: SIGXCPU; if ignored, the hard limit's SIGKILL follows 2 s later.
        status = asyncio.run(km.provisioner.poll())
        assert status in (-signal.SIGXCPU, -signal.SIGKILL), status
        assert time.monotonic() - started > 3.0


@pytest.mark.timeout(900)
def test_max_kernels_refuses_the_third(limits_daemon: int, forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (_, kc1), forkvm_kernel(forkvm_template) as (_, kc2):
        km3 = kernel_manager(forkvm_template)
        with pytest.raises(DaemonError) as refused:
            km3.start_kernel()
        message = str(refused.value)
        assert "max_kernels" in message and "limit" in message, message
        assert "2" in message, message
        assert_usable(kc1)
        assert_usable(kc2)
    # Once one is gone, a new one may start.
    with forkvm_kernel(forkvm_template) as (_, kc):
        assert_usable(kc)


@pytest.mark.timeout(900)
def test_max_kernels_holds_for_concurrent_launches(limits_daemon: int, forkvm_template: str) -> None:
    """Launches racing each other must not all pass the check before any of them registers."""
    # A template this daemon has no warm pool for yet: every launch restores and resumes a VM
    # (seconds), so all of them are in flight together.
    call_sync("template_build", name=SMALL_TEMPLATE, memory_mib=SMALL_MIB)
    assert SMALL_TEMPLATE not in call_sync("status", autostart=False)["pools"]
    config = Config()
    config.ForkvmProvisioner.template = SMALL_TEMPLATE

    async def launch() -> AsyncKernelManager:
        km = AsyncKernelManager(kernel_name="forkvm", config=config)
        await km.start_kernel()
        return km

    async def scenario() -> tuple[int, list[BaseException]]:
        results = await asyncio.gather(*(launch() for _ in range(5)), return_exceptions=True)
        started = [r for r in results if isinstance(r, AsyncKernelManager)]
        refused = [r for r in results if isinstance(r, BaseException)]
        await asyncio.gather(*(km.shutdown_kernel(now=True) for km in started), return_exceptions=True)
        return len(started), refused

    started, refused = asyncio.run(scenario())
    assert started == 2, f"{started} kernels started with max_kernels=2; refusals: {refused}"
    assert all(isinstance(e, DaemonError) and "max_kernels" in str(e) for e in refused), refused


WALL_LIMIT_S = 20


@pytest.mark.timeout(900)
def test_wall_time_limit_ends_an_idle_kernel(tmp_path: Path, forkvm_template: str) -> None:
    with private_daemon(tmp_path / "runtime", f"--ForkvmDaemon.wall_time_limit_s={WALL_LIMIT_S}"):
        km = kernel_manager(forkvm_template)
        requested = time.monotonic()  # the limit runs from the launch, which is after this
        km.start_kernel()
        kc = client(km)
        try:
            assert_usable(kc)
            time.sleep(max(0.0, WALL_LIMIT_S - 5 - (time.monotonic() - requested)))
            assert km.is_alive(), "killed before its wall-time limit"
            assert wait_until(lambda: not km.is_alive(), 60, interval=0.2), "alive long past its wall-time limit"
            lived = time.monotonic() - requested
            assert WALL_LIMIT_S <= lived <= WALL_LIMIT_S + 30, lived
            assert asyncio.run(km.provisioner.poll()) is not None
            with pytest.raises(Exception):
                kc.execute("1", reply=True, timeout=5)
        finally:
            kc.stop_channels()
            km.shutdown_kernel(now=True)
