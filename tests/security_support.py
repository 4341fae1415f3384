"""Helpers for the security tests (tests/test_security_*.py, issue 7).

Real daemons, real QEMU, real ZMQ and jupyter_client; nothing is mocked. Tests that need
daemon settings other than the defaults (limits, max_kernels) start their own daemon with
`private_daemon`, which points FORKVM_RUNTIME_DIR at a fresh directory for as long as it runs,
so the provisioner and daemon_client of this process talk to it; the template cache is shared.
"""

from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from jupyter_client.blocking import BlockingKernelClient
from traitlets.config import Config

from kernelprovider import paths
from kernelprovider.daemon_client import call_sync, daemon_running
from tests.jupyter_support import wait_until

# Generous on purpose: two shared cores, every VM emulated (TCG), other VMs running beside.
KERNEL_START_TIMEOUT_S = 180
CELL_TIMEOUT_S = 180


def env_int(name: str, default: int) -> int:
    """A count a CI job may lower or raise (e.g. FORKVM_LEAK_CYCLES)."""
    value = os.environ.get(name)
    return int(value) if value else default


# --- daemons ---------------------------------------------------------------------------------
def daemon_pid() -> int:
    return int(paths.daemon_pid_file().read_text())


@contextlib.contextmanager
def private_daemon(runtime: Path, *traitlets: str, start_timeout: float = 60.0) -> Iterator[int]:
    """`forkvm daemon run` with extra `--ForkvmDaemon.x=y` options; yields its pid.

    While the context is active FORKVM_RUNTIME_DIR names `runtime`, so every daemon client of
    this process (provisioner, call_sync) uses this daemon. It is stopped with the `stop` API.
    """
    runtime.mkdir(parents=True, exist_ok=True)
    runtime.chmod(0o700)
    previous = os.environ.get("FORKVM_RUNTIME_DIR")
    os.environ["FORKVM_RUNTIME_DIR"] = str(runtime)
    log = open(runtime / "daemon.log", "ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "kernelprovider.cli", "daemon", "run", *traitlets],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + start_timeout
        while not daemon_running(paths.daemon_socket()):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"private daemon did not start:\n{(runtime / 'daemon.log').read_text()[-3000:]}")
            time.sleep(0.1)
        yield process.pid
    finally:
        try:
            if process.poll() is None and daemon_running(paths.daemon_socket()):
                call_sync("stop", autostart=False)
            process.wait(timeout=60)
        except Exception:
            process.kill()
            process.wait(timeout=30)
        finally:
            log.close()
            if previous is None:
                os.environ.pop("FORKVM_RUNTIME_DIR", None)
            else:
                os.environ["FORKVM_RUNTIME_DIR"] = previous


def pool_settled(template: str, timeout: float = 300.0) -> bool:
    """Wait until the daemon's warm pool of `template` is full (or has no pool)."""

    def full() -> bool:
        pool = call_sync("status", autostart=False)["pools"].get(template)
        return pool is None or pool["ready"] >= pool["size"]

    return wait_until(full, timeout, interval=0.5)


def daemon_kernel(kernel_id: str) -> dict[str, Any]:
    entry = next((k for k in call_sync("list", autostart=False) if k["kernel_id"] == kernel_id), None)
    assert entry is not None, f"the daemon does not know kernel {kernel_id}"
    return entry


# --- processes ---------------------------------------------------------------------------------
def pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")




# --- kernels through jupyter_client -------------------------------------------------------------
def kernel_manager(template: str | None = None, **provisioner: Any) -> KernelManager:
    config = Config()
    if template is not None:
        provisioner["template"] = template
    for key, value in provisioner.items():
        setattr(config.ForkvmProvisioner, key, value)
    return KernelManager(kernel_name="forkvm", config=config)


def client(km: KernelManager) -> BlockingKernelClient:
    kc = km.client()
    # No heartbeat: under TCG a busy guest misses heartbeats and the client would give up.
    kc.start_channels(hb=False)
    kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
    return kc


@contextlib.contextmanager
def forkvm_kernel(template: str | None = None, **start: Any) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km = kernel_manager(template)
    km.start_kernel(**start)
    kc = None
    try:
        if template is not None and "branch_from" not in start:
            # The provisioner's `template` setting must reach the daemon (it did not while the
            # kernelspec pinned template "default").
            assert daemon_kernel(km.kernel_id)["template"] == template
        kc = client(km)
        yield km, kc
    finally:
        if kc is not None:
            kc.stop_channels()
        with contextlib.suppress(Exception):
            km.shutdown_kernel(now=True)


def run_cell(kc: BlockingKernelClient, code: str, timeout: float = CELL_TIMEOUT_S) -> tuple[dict, list[dict]]:
    outputs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append, store_history=False)
    return reply, outputs


def evaluate(kc: BlockingKernelClient, code: str, expression: str, timeout: float = CELL_TIMEOUT_S) -> Any:
    """Run `code`, then return the value of `expression`, parsed back from its repr."""
    reply = kc.execute(code, reply=True, timeout=timeout, store_history=False, user_expressions={"v": expression})
    content = reply["content"]
    assert content["status"] == "ok", f"{content.get('ename')}: {content.get('evalue')}"
    value = content["user_expressions"]["v"]
    assert value["status"] == "ok", f"{value.get('ename')}: {value.get('evalue')}"
    return ast.literal_eval(value["data"]["text/plain"])


def stream_text(outputs: list[dict], name: str = "stdout") -> str:
    return "".join(m["content"]["text"] for m in outputs if m["msg_type"] == "stream" and m["content"]["name"] == name)


def assert_usable(kc: BlockingKernelClient, token: int = 7) -> None:
    assert kc.kernel_info(reply=True, timeout=CELL_TIMEOUT_S)["content"]["status"] == "ok"
    assert evaluate(kc, "", f"{token} * 6") == token * 6
