"""Saving and loading VM state through QEMU migration, with guest RAM left out.

RAM lives in a memory-backend-file; `x-ignore-shared` keeps it out of the migration stream, so
a state file holds only CPU and device state (about a megabyte) and a restore maps the RAM
file instead of copying it.
"""

from __future__ import annotations

import asyncio
import shlex
from pathlib import Path

from vmcore.errors import EngineError
from vmcore.qemu.qmp import QmpClient

POLL_S = 0.005


async def _set_capabilities(qmp: QmpClient, ignore_shared: bool) -> None:
    await qmp.execute(
        "migrate-set-capabilities",
        capabilities=[{"capability": "x-ignore-shared", "state": ignore_shared}],
    )


async def _wait_for_completion(qmp: QmpClient, what: str, timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        info = await qmp.execute("query-migrate")
        status = info.get("status")
        if status == "completed":
            return
        if status in ("failed", "cancelled"):
            raise EngineError(f"{qmp.name}: {what} {status}: {info.get('error-desc', 'no reason given')}")
        if asyncio.get_running_loop().time() > deadline:
            raise EngineError(f"{qmp.name}: {what} did not finish within {timeout:.0f} s (status {status})")
        await asyncio.sleep(POLL_S)


async def save_state(qmp: QmpClient, state_file: Path, ignore_shared: bool = True, timeout: float = 300.0) -> None:
    """Write the paused VM's state to `state_file`."""
    await _set_capabilities(qmp, ignore_shared)
    await qmp.execute("migrate", uri=f"exec:cat > {shlex.quote(str(state_file))}")
    await _wait_for_completion(qmp, "saving state", timeout)


async def load_state(qmp: QmpClient, state_file: Path, ignore_shared: bool = True, timeout: float = 300.0) -> None:
    """Load `state_file` into a VM started with `-incoming defer`; it stays paused."""
    await _set_capabilities(qmp, ignore_shared)
    await qmp.execute("migrate-incoming", uri=f"exec:cat {shlex.quote(str(state_file))}")
    await _wait_for_completion(qmp, "loading state", timeout)
