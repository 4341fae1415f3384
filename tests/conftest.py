"""Shared fixtures for end-to-end tests: a private forkvm daemon and a built template.

Each test session gets its own runtime directory (daemon socket, log), so it never talks to a
user's daemon, while the cache (guest kernel, initramfs, templates) is shared and keyed by
inputs: the first session on a machine builds it, later ones find it up to date.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelprovider import paths
from kernelprovider.daemon_client import call_sync, daemon_running
from tests import vm_helpers as vh
from tests.jupyter_support import pid_alive
from vmcore.qemu.engine import QemuEngine

TEMPLATE = "default"


def qemu_processes(runtime_hint: str = "") -> list[str]:
    out = subprocess.run(["pgrep", "-a", "qemu-system-x86"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if runtime_hint in line]


def daemon_qemu_pids(daemon_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(daemon_pid), "qemu-system"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def wait_for_exit(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if pid_alive(pid)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


@pytest.fixture(scope="session")
def forkvm_runtime(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private daemon runtime directory; the daemon is stopped and checked for leaks at the end."""
    runtime = tmp_path_factory.mktemp("forkvm-runtime")
    runtime.chmod(0o700)
    previous = os.environ.get("FORKVM_RUNTIME_DIR")
    os.environ["FORKVM_RUNTIME_DIR"] = str(runtime)
    try:
        yield runtime
    finally:
        leaked: list[int] = []
        if daemon_running(paths.daemon_socket()):
            pid = int(paths.daemon_pid_file().read_text())
            vms = daemon_qemu_pids(pid)
            call_sync("stop", autostart=False)
            wait_for_exit([pid], 30)
            # QEMU dies with its daemon (shutdown kills it, PDEATHSIG backs that up).
            leaked = wait_for_exit(vms, 10)
        log = runtime / "daemon.log"
        if log.exists() and os.environ.get("FORKVM_ARTIFACTS"):
            shutil.copy(log, Path(os.environ["FORKVM_ARTIFACTS"]) / "daemon.log")
        if previous is None:
            os.environ.pop("FORKVM_RUNTIME_DIR", None)
        else:
            os.environ["FORKVM_RUNTIME_DIR"] = previous
        assert not leaked, f"QEMU processes {leaked} outlived the test daemon"


@pytest.fixture(scope="session")
def forkvm_template(forkvm_runtime: Path) -> str:
    """The default template, built (or found up to date) through the daemon."""
    result = call_sync("template_build", name=TEMPLATE)
    assert result["name"] == TEMPLATE
    return TEMPLATE


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    path = Path(os.environ.get("FORKVM_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def loop() -> Iterator[vh.LoopThread]:
    """An event loop in a thread, for tests that drive the asyncio engine from blocking code."""
    thread = vh.LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="module")
def engine(forkvm_template: str) -> QemuEngine:
    return vh.qemu_engine()
