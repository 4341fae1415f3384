"""Helpers shared by the Jupyter provider tests (tests/test_jupyter_*.py).

Everything here talks to the real daemon of the test session (FORKVM_RUNTIME_DIR set by the
`forkvm_runtime` fixture of conftest.py) and to real QEMU processes; nothing is mocked.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernelprovider import paths
from kernelprovider.daemon_client import call_sync, daemon_running

# Generous on purpose: the host has two shared cores and every VM is emulated (TCG).
KERNEL_START_TIMEOUT_S = 120
CELL_TIMEOUT_S = 120
TEMPLATE_NAME = "default"  # conftest.TEMPLATE

# Every qemu-system process the test daemon has been seen to own; the leak check at the end
# of the run (test_jupyter_zz_leaks.py) asserts that none of them outlives the daemon.
SEEN_QEMU_PIDS: set[int] = set()


def daemon_pid() -> int | None:
    if not daemon_running(paths.daemon_socket()):
        return None
    try:
        return int(paths.daemon_pid_file().read_text())
    except (OSError, ValueError):
        return None


def qemu_children(pid: int | None = None) -> set[int]:
    """qemu-system processes whose parent is the (test) daemon."""
    pid = daemon_pid() if pid is None else pid
    if pid is None:
        return set()
    out = subprocess.run(["pgrep", "-P", str(pid), "qemu-system"], capture_output=True, text=True).stdout
    found = {int(p) for p in out.split()}
    SEEN_QEMU_PIDS.update(found)
    return found


def pid_alive(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:  # a daemon this process auto-started
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie is not a leak (its parent will reap it), but it is not running either.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    """predicate()'s first truthy value, or its last value once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def daemon_kernels() -> list[dict[str, Any]]:
    return call_sync("list", autostart=False)


def kernel_entry(kernel_id: str) -> dict[str, Any] | None:
    return next((k for k in daemon_kernels() if k["kernel_id"] == kernel_id), None)


def kernel_qemu_pid(kernel_id: str) -> int:
    """The QEMU pid of a kernel, as `forkvm ps --json` reports it."""
    entry = kernel_entry(kernel_id)
    assert entry is not None, f"the daemon does not know kernel {kernel_id}"
    pid = entry.get("pid")
    assert isinstance(pid, int) and pid > 0, f"`forkvm ps --json` gives no QEMU pid for {kernel_id}: {entry}"
    assert pid in qemu_children(), f"pid {pid} of kernel {kernel_id} is not a QEMU child of the test daemon"
    return pid


def pool_settled(template: str, timeout: float = 180.0) -> None:
    """Wait until the warm pool of `template` is full again, so that timing checks do not
    compete with background restores for the two shared cores."""

    def full() -> bool:
        pools = call_sync("status", autostart=False)["pools"]
        pool = pools.get(template)
        return pool is None or pool["ready"] >= pool["size"]

    wait_until(full, timeout, interval=0.5)


def forkvm_env() -> dict[str, str]:
    """Environment for jupyter subprocesses: the test daemon's runtime directory, no user config."""
    env = dict(os.environ)
    assert "FORKVM_RUNTIME_DIR" in env, "the forkvm_runtime fixture must be active"
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env
