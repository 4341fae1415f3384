"""Issue 4: interrupting, losing and restarting forkvm kernels through jupyter_client and nbclient.

Interrupts must work both ways Jupyter delivers them: "signal" (the kernelspec's mode: the
provisioner asks the daemon, the guest agent sends SIGINT) and "message" (interrupt_request on
the control channel, handled by ipykernel itself). A VM killed from outside must be noticed
within 2 s, fail a pending cell instead of hanging it, and a restart must give a fresh fork.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import nbformat
import pytest
from jupyter_client import KernelManager
from jupyter_client.utils import run_sync
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError

from tests.jupyter_support import (
    CELL_TIMEOUT_S,
    KERNEL_START_TIMEOUT_S,
    TEMPLATE_NAME,
    forkvm_env,
    kernel_entry,
    kernel_qemu_pid,
    pid_alive,
    pool_settled,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]

INTERRUPT_DEADLINE_S = 2.0
DEATH_DEADLINE_S = 2.0
# Other engineers' VMs share this host's two cores. When the load is several times the core
# count, a slow interrupt is retried (each try must still meet the 2 s bound on its own).
MAX_INTERRUPT_ATTEMPTS = 3


def host_overloaded() -> bool:
    return os.getloadavg()[0] > 3 * (os.cpu_count() or 1)


def execute(kc: Any, code: str, timeout: float = CELL_TIMEOUT_S) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    outputs: list[dict[str, Any]] = []
    reply = kc.execute_interactive(code, timeout=timeout, output_hook=outputs.append)
    return reply, outputs


def result_text(outputs: list[dict[str, Any]]) -> str:
    return "".join(m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result")


def start(km: KernelManager) -> Any:
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
    return kc


@pytest.fixture
def kernel() -> Iterator[tuple[KernelManager, Any]]:
    km = KernelManager(kernel_name="forkvm")
    kc = start(km)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        if km.has_kernel:
            km.shutdown_kernel(now=True)


def wait_for_execution_start(kc: Any, msg_id: str) -> None:
    """Block until the kernel has begun running request `msg_id` (its execute_input)."""
    deadline = time.monotonic() + CELL_TIMEOUT_S
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=deadline - time.monotonic())
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
            return
    raise AssertionError("the cell never started")


def shell_reply(kc: Any, msg_id: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_shell_msg(timeout=max(0.0, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") == msg_id:
            return msg


@pytest.mark.parametrize("mode", ["signal", "message"])
def test_interrupt_sleep_keeps_state(kernel: tuple[KernelManager, Any], mode: str) -> None:
    km, kc = kernel
    assert km.kernel_spec.interrupt_mode == "signal"  # what our kernelspec declares
    km.kernel_spec.interrupt_mode = mode
    reply, _ = execute(kc, "survivor = 41")
    assert reply["content"]["status"] == "ok"
    # Background refills of the warm pool compete for the shared cores; let them finish
    # so the 2 s bound measures the interrupt path, not the neighbours.
    pool_settled(TEMPLATE_NAME)

    timings = []
    for _attempt in range(MAX_INTERRUPT_ATTEMPTS):
        msg_id = kc.execute("import time\nstarted = time.time()\ntime.sleep(60)\nfinished = True")
        wait_for_execution_start(kc, msg_id)
        time.sleep(0.5)  # let the cell enter time.sleep()
        t0 = time.monotonic()
        km.interrupt_kernel()
        reply = shell_reply(kc, msg_id, timeout=30)
        elapsed = time.monotonic() - t0
        assert reply["content"]["status"] == "error", reply["content"]
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        timings.append(round(elapsed, 2))
        if elapsed < INTERRUPT_DEADLINE_S or not host_overloaded():
            break
    print(f"{mode} interrupt answered in {timings} s")
    assert timings[-1] < INTERRUPT_DEADLINE_S, f"{mode} interrupt took {timings} s (load {os.getloadavg()})"

    reply, outputs = execute(kc, "survivor + 1, 'finished' in dir()")
    assert reply["content"]["status"] == "ok"
    assert result_text(outputs) == "(42, False)"
    assert km.is_alive()


def test_vm_killed_from_outside_then_restart(kernel: tuple[KernelManager, Any]) -> None:
    km, kc = kernel
    reply, _ = execute(kc, "before_restart = 'here'")
    assert reply["content"]["status"] == "ok"
    old_entry = kernel_entry(km.kernel_id)
    assert old_entry is not None
    pid = kernel_qemu_pid(km.kernel_id)

    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    died = wait_until(lambda: not km.is_alive(), DEATH_DEADLINE_S + 1)
    elapsed = time.monotonic() - t0
    assert died and elapsed < DEATH_DEADLINE_S, f"km.is_alive() still True {elapsed:.2f} s after SIGKILL"
    assert run_sync(km.provisioner.poll)() is not None
    assert wait_until(lambda: not pid_alive(pid), 5), f"QEMU {pid} was not reaped"

    before = km.get_connection_info()
    km.restart_kernel()
    # A new fork behind the same ports and key (as a local kernel restarts): the client made
    # before the restart carries on.
    assert km.get_connection_info() == before
    kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
    new_entry = kernel_entry(km.kernel_id)
    assert new_entry is not None and new_entry["status"] is None
    assert new_entry["vm_id"] != old_entry["vm_id"], "restart must give a new fork"
    assert new_entry["pid"] != pid
    assert new_entry["session"] != old_entry["session"]
    reply, _ = execute(kc, "before_restart")
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "NameError"
    reply, outputs = execute(kc, "1+1")
    assert reply["content"]["status"] == "ok" and result_text(outputs) == "2"


def test_nbclient_pending_cell_fails_when_vm_killed() -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_code_cell("import time\ntime.sleep(60)"),
            nbformat.v4.new_code_cell("x"),
        ]
    )
    kill_times: dict[str, float] = {}
    kill_errors: list[str] = []
    threads: list[threading.Thread] = []

    def kill_later(kernel_id: str) -> None:
        time.sleep(3)  # the sleep cell is running in the guest by then
        kill_times["started"] = time.monotonic()
        result = subprocess.run(
            ["forkvm", "kill", kernel_id], capture_output=True, text=True, env=forkvm_env(), timeout=60
        )
        kill_times["done"] = time.monotonic()  # the VM is gone by now
        if result.returncode != 0:
            kill_errors.append(result.stderr)

    def on_cell_execute(cell: Any, cell_index: int) -> None:
        if cell_index == 1:
            threads.append(threading.Thread(target=kill_later, args=(client.km.kernel_id,), daemon=True))
            threads[-1].start()

    client = NotebookClient(
        nb, kernel_name="forkvm", timeout=CELL_TIMEOUT_S, startup_timeout=KERNEL_START_TIMEOUT_S,
        on_cell_execute=on_cell_execute,
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(DeadKernelError):
        client.execute()
    failed_at = time.monotonic()
    assert threads, "the sleep cell never started"
    threads[0].join(60)
    assert not kill_errors, kill_errors
    assert "started" in kill_times and failed_at > kill_times["started"], "the cell failed before the kill"
    # nbclient polls is_alive() once a second: the error follows the VM's death closely, and
    # comes long before the 60 s sleep or the cell timeout would end the cell.
    assert failed_at - kill_times["done"] < 5, f"DeadKernelError came {failed_at - kill_times['done']:.1f} s after the kill"
    assert failed_at - started < 60
    assert nb.cells[2].get("execution_count") is None
