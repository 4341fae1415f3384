"""Saving, loading and transferring VM state through QEMU migration.

Templates: RAM lives in a memory-backend-file; `x-ignore-shared` keeps it out of the
migration stream, so a state file holds only CPU and device state (about a megabyte) and a
restore maps the RAM file instead of copying it.

Branches: a running fork's RAM is a private copy-on-write mapping, so it travels in the
stream, live and straight from the source QEMU to the branch QEMU over a Unix socket; the
source pauses only for the final dirty pages (QEMU's downtime), then runs on.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from vmcore.errors import EngineError
from vmcore.qemu.qmp import QmpClient

POLL_S = 0.005
# QEMU throttles migration to 128 MiB/s by default; a local transfer should go at memory speed.
LOCAL_BANDWIDTH = 64 << 30
STATE_FD_NAME = "forkvm-state"


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


async def _pass_file(qmp: QmpClient, path: Path, flags: int) -> str:
    """Hand QEMU an open file as a named fd: its sandbox forbids spawning a helper such as `cat`."""
    fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
    try:
        await qmp.execute("getfd", pass_fd=fd, fdname=STATE_FD_NAME)
    finally:
        os.close(fd)
    return f"fd:{STATE_FD_NAME}"


async def save_state(qmp: QmpClient, state_file: Path, ignore_shared: bool = True, timeout: float = 300.0) -> None:
    """Write the paused VM's state to `state_file`."""
    await _set_capabilities(qmp, ignore_shared)
    uri = await _pass_file(qmp, state_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    await qmp.execute("migrate", uri=uri)
    await _wait_for_completion(qmp, "saving state", timeout)


async def load_state(qmp: QmpClient, state_file: Path, ignore_shared: bool = True, timeout: float = 300.0) -> None:
    """Load `state_file` into a VM started with `-incoming defer`; it stays paused."""
    await _set_capabilities(qmp, ignore_shared)
    try:
        uri = await _pass_file(qmp, state_file, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise EngineError(f"{qmp.name}: no state file {state_file}") from exc
    await qmp.execute("migrate-incoming", uri=uri)
    await _wait_for_completion(qmp, "loading state", timeout)


async def listen_for_state(qmp: QmpClient, socket_path: Path) -> None:
    """Make a VM started with `-incoming defer` accept a full migration on `socket_path`."""
    await _set_capabilities(qmp, False)
    await qmp.execute("migrate-incoming", uri=f"unix:{socket_path}")


async def send_state_live(qmp: QmpClient, socket_path: Path, timeout: float = 300.0) -> float:
    """Live-migrate a running VM to `socket_path`; it ends paused. Returns the downtime in seconds."""
    await _set_capabilities(qmp, False)
    await qmp.execute("migrate-set-parameters", **{"max-bandwidth": LOCAL_BANDWIDTH, "downtime-limit": 50})
    await qmp.execute("migrate", uri=f"unix:{socket_path}")
    await _wait_for_completion(qmp, "sending state", timeout)
    info = await qmp.execute("query-migrate")
    return float(info.get("downtime", 0)) / 1000.0


async def wait_for_incoming(qmp: QmpClient, timeout: float = 300.0) -> None:
    await _wait_for_completion(qmp, "receiving state", timeout)
