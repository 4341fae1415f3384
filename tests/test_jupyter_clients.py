"""Issue 4: the `forkvm` kernel through Jupyter's own clients (jupyter console, jupyter run,
jupyter_client.KernelManager), with real ZMQ connections into real VMs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from jupyter_client import KernelManager

from tests.jupyter_support import CELL_TIMEOUT_S, KERNEL_START_TIMEOUT_S, forkvm_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]


def _run(argv: list[str], stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=forkvm_env(), cwd=cwd,
        timeout=KERNEL_START_TIMEOUT_S + 2 * CELL_TIMEOUT_S,
    )  # fmt: skip


def test_jupyter_console_evaluates_cells(tmp_path: Path) -> None:
    # --simple-prompt reads stdin line by line; EOF at the end makes the console ask the
    # kernel to shut down and exit.
    stdin = "1+1\nimport numpy; numpy.arange(10).sum()\nprint('console', 'done')\n"
    result = _run(
        ["jupyter", "console", "--kernel", "forkvm", "--simple-prompt",
         f"--ZMQTerminalInteractiveShell.kernel_timeout={KERNEL_START_TIMEOUT_S}",
         f"--ZMQTerminalInteractiveShell.timeout={CELL_TIMEOUT_S}"],
        stdin=stdin, cwd=tmp_path,
    )  # fmt: skip
    output = result.stdout
    assert result.returncode == 0, f"stdout:\n{output}\nstderr:\n{result.stderr}"
    assert "Out[1]: 2" in output, output
    assert "Out[2]: 45" in output or "Out[2]: np.int64(45)" in output, output
    assert "console done" in output, output


def test_jupyter_run_executes_file(tmp_path: Path) -> None:
    script = tmp_path / "cells.py"
    script.write_text("print('one plus one is', 1+1)\nimport numpy\nprint('sum', numpy.arange(10).sum())\n")
    result = _run(["jupyter", "run", "--kernel", "forkvm", str(script)], cwd=tmp_path)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "one plus one is 2" in result.stdout, result.stdout
    assert "sum 45" in result.stdout, result.stdout


def _execute(kc, code: str) -> tuple[dict, list[dict]]:  # type: ignore[no-untyped-def]
    outputs: list[dict] = []
    reply = kc.execute_interactive(code, timeout=CELL_TIMEOUT_S, output_hook=outputs.append)
    return reply, outputs


def _result_text(outputs: list[dict]) -> str:
    return "".join(
        m["content"]["data"]["text/plain"] for m in outputs if m["msg_type"] == "execute_result"
    )


def test_kernel_manager_start_execute_shutdown() -> None:
    km = KernelManager(kernel_name="forkvm")
    km.start_kernel()
    try:
        assert type(km.provisioner).__name__ == "ForkvmProvisioner"
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
            reply, outputs = _execute(kc, "1+1")
            assert reply["content"]["status"] == "ok"
            assert _result_text(outputs) == "2"
            reply, outputs = _execute(kc, "import numpy; numpy.arange(10).sum()")
            assert reply["content"]["status"] == "ok"
            assert _result_text(outputs) in ("45", "np.int64(45)")
            info = kc.kernel_info(reply=True, timeout=CELL_TIMEOUT_S)["content"]
            assert info["language_info"]["name"] == "python"
            assert km.is_alive()
        finally:
            kc.stop_channels()
    finally:
        km.shutdown_kernel(now=False)
    assert not km.is_alive()
