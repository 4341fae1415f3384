"""Issue 5: branching a running kernel into a new kernel with the same state.

Through jupyter_client (`KernelManager.start_kernel(branch_from=...)`), the CLI
(`forkvm branch`), the Jupyter server extension (POST /api/forkvm/kernels/<id>/branch) and the
JupyterLab command "Branch Kernel" in headless Chromium. Real VMs, the test session's private
daemon (conftest.py), nothing mocked.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import BlockingKernelClient, KernelManager

from kernelprovider.daemon_client import DaemonError, call_sync
from tests.jupyter_support import CELL_TIMEOUT_S, KERNEL_START_TIMEOUT_S, forkvm_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]

# A branch migrates the whole guest RAM (1 GiB by default) between two TCG VMs on a busy host.
BRANCH_TIMEOUT_S = 180
BIG_ELEMENTS = 100 * 2**20 // 8  # float64: 100 MiB

SETUP = f"""
import random, time
import numpy as np
x = 42
big = np.arange({BIG_ELEMENTS}, dtype=np.float64)   # 100 MiB, every page written
def f(n):
    return 2 * n + x
print('setup done', big.nbytes)
"""
CHECK = "print('state', x, big.nbytes, float(big[-1]), float(big.sum()), f(1))"
EXPECTED_STATE = f"state 42 {BIG_ELEMENTS * 8} {float(BIG_ELEMENTS - 1)} {float(BIG_ELEMENTS * (BIG_ELEMENTS - 1) / 2)} 44"


# --- helpers ------------------------------------------------------------------------------
def start_kernel(branch_from: str | None = None, kernel_name: str = "forkvm") -> tuple[KernelManager, BlockingKernelClient]:
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(**({"branch_from": branch_from} if branch_from else {}))
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
    return km, kc


def client_for(connection_file: str) -> BlockingKernelClient:
    kc = BlockingKernelClient(connection_file=connection_file)
    kc.load_connection_file()
    kc.start_channels()
    kc.wait_for_ready(timeout=KERNEL_START_TIMEOUT_S)
    return kc


def stop(km: KernelManager | None, kc: BlockingKernelClient | None) -> None:
    if kc is not None:
        kc.stop_channels()
    if km is not None and km.has_kernel:
        km.shutdown_kernel(now=True)


def run(kc: BlockingKernelClient, code: str, timeout: float = CELL_TIMEOUT_S) -> str:
    """Run `code`; its stdout. Fails on an error in the cell."""
    out: list[str] = []

    def hook(msg: dict[str, Any]) -> None:
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            out.append("\n".join(msg["content"]["traceback"]))

    reply = kc.execute_interactive(code, timeout=timeout, output_hook=hook)
    assert reply["content"]["status"] == "ok", "".join(out)
    return "".join(out)


def forkvm_cli(*args: str, timeout: float = BRANCH_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kernelprovider.cli", *args],
        capture_output=True, text=True, env=forkvm_env(), timeout=timeout,
    )  # fmt: skip


def daemon_release(kernel_id: str) -> None:
    try:
        call_sync("release", autostart=False, kernel_id=kernel_id)
    except Exception:  # noqa: BLE001 - already gone
        pass


# --- jupyter_client and CLI --------------------------------------------------------------
def test_branch_carries_state_and_diverges() -> None:
    """A's variables, 100 MiB array and function are in B, B and C (a branch of B) go on on
    their own, get their own random streams, and survive the death of their relatives."""
    km_a = kc_a = km_b = kc_b = km_c = kc_c = None
    try:
        km_a, kc_a = start_kernel()
        assert "setup done" in run(kc_a, SETUP)
        assert run(kc_a, CHECK).strip() == EXPECTED_STATE

        started = time.monotonic()
        km_b, kc_b = start_kernel(branch_from=km_a.kernel_id)
        branch_s = time.monotonic() - started
        entry = next(k for k in call_sync("list", autostart=False) if k["kernel_id"] == km_b.kernel_id)
        assert entry["parent"] == km_a.kernel_id
        print(f"branch answered kernel_info {branch_s:.2f} s after start_kernel(branch_from=...)")

        assert run(kc_b, CHECK).strip() == EXPECTED_STATE
        # B diverges; A keeps its own state.
        run(kc_b, "x = 7")
        assert run(kc_b, "print(x, f(1))").strip() == "7 9"
        assert run(kc_a, "print(x, f(1))").strip() == "42 44"
        # Fresh random streams in the branch: the next numbers differ.
        draw = "print(random.random(), np.random.random())"
        a_draw, b_draw = run(kc_a, draw).split(), run(kc_b, draw).split()
        assert a_draw[0] != b_draw[0] and a_draw[1] != b_draw[1], (a_draw, b_draw)
        # Both go on answering.
        assert run(kc_a, "big[0] = -1; print(big[0])").strip() == "-1.0"
        assert run(kc_b, "print(big[0])").strip() == "0.0"

        # A branch of a branch.
        km_c, kc_c = start_kernel(branch_from=km_b.kernel_id)
        assert run(kc_c, "print(x, big[0], f(1))").strip() == "7 0.0 9"
        run(kc_c, "x = 3")
        assert run(kc_b, "print(x)").strip() == "7"

        # Killing the source (A) leaves its branch (B) working ...
        stop(km_a, kc_a)
        km_a = kc_a = None
        assert run(kc_b, "print(x + 1)").strip() == "8"
        # ... and killing a branch (C's VM, abruptly) leaves its source (B) working.
        call_sync("kill", autostart=False, kernel_id=km_c.kernel_id)
        assert run(kc_b, "print(x + 2, big.nbytes)").strip() == f"9 {BIG_ELEMENTS * 8}"
    finally:
        stop(km_c, kc_c)
        stop(km_b, kc_b)
        stop(km_a, kc_a)


def test_restarting_a_branch_gives_a_fresh_kernel() -> None:
    """A restart of a branch forks the template (like any restart), it does not branch the source again."""
    km_a = kc_a = km_b = kc_b = None
    try:
        km_a, kc_a = start_kernel()
        run(kc_a, "x = 42")
        km_b, kc_b = start_kernel(branch_from=km_a.kernel_id)
        assert run(kc_b, "print(x)").strip() == "42"
        stop(None, kc_a)
        kc_a = None
        km_a.shutdown_kernel(now=True)  # the source is gone: the restart must not need it
        km_a = None
        before = km_b.get_connection_info()
        km_b.restart_kernel(now=True)
        # A new VM behind the same ports and key, as a local kernel restarts: the client made
        # before the restart carries on.
        assert km_b.get_connection_info() == before
        assert run(kc_b, "print('x' in globals())").strip() == "False"
        entry = next(k for k in call_sync("list", autostart=False) if k["kernel_id"] == km_b.kernel_id)
        assert entry["parent"] is None
    finally:
        stop(km_b, kc_b)
        stop(km_a, kc_a)


def test_cli_branch_by_id_and_by_connection_file() -> None:
    km_a = kc_a = None
    branches: list[tuple[str, BlockingKernelClient]] = []
    connection_files: list[Path] = []
    try:
        km_a, kc_a = start_kernel()
        run(kc_a, SETUP)
        km_a.write_connection_file()  # what `jupyter console --existing` would be given
        for target in (km_a.kernel_id, km_a.connection_file):
            result = forkvm_cli("branch", target)
            assert result.returncode == 0, result.stderr
            connection_file = result.stdout.strip().splitlines()[-1]
            assert Path(connection_file).exists(), result.stdout
            assert "source paused" in result.stderr, result.stderr
            kernel_id = Path(connection_file).stem.removeprefix("kernel-")
            connection_files.append(Path(connection_file))
            kc = client_for(connection_file)
            branches.append((kernel_id, kc))
            assert run(kc, CHECK).strip() == EXPECTED_STATE
            run(kc, "x = -1")
        assert run(kc_a, "print(x)").strip() == "42"
        # A connection file that cannot be written fails the branch and leaves no kernel.
        listed = {k["kernel_id"] for k in call_sync("list", autostart=False)}
        with pytest.raises(DaemonError, match="connection"):
            call_sync("branch", autostart=False, kernel_id=km_a.kernel_id, connection_dir="/proc")
        assert {k["kernel_id"] for k in call_sync("list", autostart=False)} == listed
    finally:
        for kernel_id, kc in branches:
            kc.stop_channels()
            daemon_release(kernel_id)
        stop(km_a, kc_a)
    # The daemon wrote each branch's connection file, and removed it with the kernel.
    assert [path for path in connection_files if path.exists()] == []


# --- bad input ----------------------------------------------------------------------------
def test_branching_a_dead_kernel_fails_clearly() -> None:
    km_a, kc_a = start_kernel()
    try:
        call_sync("kill", autostart=False, kernel_id=km_a.kernel_id)  # the VM dies; jupyter has not noticed
        started = time.monotonic()
        with pytest.raises(Exception, match="is dead"):
            KernelManager(kernel_name="forkvm").start_kernel(branch_from=km_a.kernel_id)
        result = forkvm_cli("branch", km_a.kernel_id, timeout=60)
        assert result.returncode != 0 and "is dead" in result.stderr, result
        assert time.monotonic() - started < 60
    finally:
        stop(km_a, kc_a)


def test_branching_unknown_or_foreign_kernels_fails_clearly(tmp_path: Path) -> None:
    random_id = str(uuid.uuid4())
    with pytest.raises(Exception, match=f"no forkvm kernel '{random_id}'"):
        KernelManager(kernel_name="forkvm").start_kernel(branch_from=random_id)
    result = forkvm_cli("branch", random_id, timeout=60)
    assert result.returncode != 0 and f"no forkvm kernel '{random_id}'" in result.stderr, result

    # An ordinary (non-VM) python3 kernel: the daemon has never heard of it.
    km_py, kc_py = start_kernel(kernel_name="python3")
    try:
        with pytest.raises(Exception, match="no forkvm kernel"):
            KernelManager(kernel_name="forkvm").start_kernel(branch_from=km_py.kernel_id)
        km_py.write_connection_file()
        result = forkvm_cli("branch", km_py.connection_file, timeout=60)
        assert result.returncode != 0 and "is not the connection file of a forkvm kernel" in result.stderr, result
        assert run(kc_py, "print(1 + 1)").strip() == "2"  # untouched
    finally:
        stop(km_py, kc_py)


def test_branching_a_busy_kernel_carries_the_running_cell() -> None:
    """Branching while a cell runs is allowed: the branch is a copy of the VM mid-cell.

    What the branch sees (asserted below): the cell goes on running in the branch too, from
    where it was (time.sleep ends at the same moment as in the source, since the guest clock
    is carried over); the branch's shell answers kernel_info only once that cell has finished
    (ipykernel runs shell requests one at a time), its control channel answers at once; the
    cell's later output appears on the branch's iopub, and its execute_reply goes to no one
    (the client that asked is the source's). Interrupting the branch stops only the branch's
    copy of the cell.
    """
    km_a, kc_a = start_kernel()
    km_b = kc_b = None
    try:
        run(kc_a, "import time")
        msg_id = kc_a.execute("t0 = time.monotonic(); time.sleep(30); print('slept', round(time.monotonic() - t0))")
        # Wait until A is busy in the cell.
        deadline = time.monotonic() + CELL_TIMEOUT_S
        while time.monotonic() < deadline:
            msg = kc_a.get_iopub_msg(timeout=CELL_TIMEOUT_S)
            if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "execute_input":
                break
        time.sleep(1)
        started = time.monotonic()
        km_b = KernelManager(kernel_name="forkvm")
        km_b.start_kernel(branch_from=km_a.kernel_id)  # returns; does not wait for the cell
        branch_s = time.monotonic() - started
        assert branch_s < BRANCH_TIMEOUT_S
        kc_b = km_b.client()
        kc_b.start_channels()

        # Control channel: answers while the cell runs.
        control = kc_b.control_channel
        reply_id = kc_b.session.send(control.socket, kc_b.session.msg("kernel_info_request"))["header"]["msg_id"]
        control_reply = kc_b.control_channel.get_msg(timeout=60)
        control_s = time.monotonic() - started
        assert control_reply["parent_header"]["msg_id"] == reply_id
        assert control_reply["content"]["status"] == "ok"

        # Shell: kernel_info waits for the running cell to end.
        kc_b.kernel_info()
        shell_reply = kc_b.get_shell_msg(timeout=CELL_TIMEOUT_S)
        shell_s = time.monotonic() - started
        assert shell_reply["msg_type"] == "kernel_info_reply"

        # The cell's output in the branch, on the branch's own iopub.
        b_outputs = []
        while True:
            try:
                msg = kc_b.get_iopub_msg(timeout=5)
            except Exception:  # noqa: BLE001 - queue.Empty: nothing more
                break
            if msg["msg_type"] == "stream":
                b_outputs.append(msg["content"]["text"])
        a_reply = kc_a.get_shell_msg(timeout=CELL_TIMEOUT_S)
        assert a_reply["parent_header"]["msg_id"] == msg_id and a_reply["content"]["status"] == "ok"
        print(
            f"busy branch: start_kernel returned after {branch_s:.1f} s; control kernel_info after {control_s:.1f} s; "
            f"shell kernel_info after {shell_s:.1f} s; branch iopub output {b_outputs!r}"
        )
        assert any("slept" in text for text in b_outputs), b_outputs
        assert control_s < shell_s
        # Both go on independently.
        run(kc_b, "y = 'branch'")
        assert run(kc_b, "print(y)").strip() == "branch"
        assert run(kc_a, "print('y' in globals())").strip() == "False"
    finally:
        stop(km_b, kc_b)
        stop(km_a, kc_a)


# --- Jupyter server extension and JupyterLab ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabServer:
    def __init__(self, root: Path, port: int, token: str) -> None:
        self.root, self.port, self.token = root, port, token
        self.url = f"http://127.0.0.1:{port}/"

    def api(self, method: str, path: str, body: Any = None, token: bool = True, timeout: float = BRANCH_TIMEOUT_S + 30) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"token {self.token}"
        data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else None
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                return exc.code, json.loads(raw)
            except ValueError:
                return exc.code, raw.decode(errors="replace")


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory: pytest.TempPathFactory, forkvm_template: str) -> Iterator[LabServer]:
    """JupyterLab on 127.0.0.1 with a token, talking to the test session's daemon.

    Automatic restarts are off so that a kernel the test kills stays dead (instead of being
    restarted from the template behind the test's back)."""
    root = tmp_path_factory.mktemp("lab-root")
    port, token = _free_port(), uuid.uuid4().hex
    log = open(root.parent / "jupyterlab.log", "w")
    env = forkvm_env()
    env["JUPYTER_CONFIG_DIR"] = str(root.parent / "jupyter-config")  # no user config
    env["JUPYTER_RUNTIME_DIR"] = str(root.parent / "jupyter-runtime")
    root_flag = ["--allow-root"] if os.geteuid() == 0 else []
    process = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", *root_flag, "--no-browser", "--ip=127.0.0.1", f"--port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--KernelManager.autorestart=False", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root,
    )  # fmt: skip
    server = LabServer(root, port, token)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, (root.parent / "jupyterlab.log").read_text()
            try:
                if server.api("GET", "api/status", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (root.parent / "jupyterlab.log").read_text()
            time.sleep(0.5)
        yield server
    finally:
        process.terminate()  # the server shuts its kernels down on the way out
        try:
            process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        text = (root.parent / "jupyterlab.log").read_text(errors="replace")
        artifacts = os.environ.get("FORKVM_ARTIFACTS")
        if artifacts:
            Path(artifacts, "jupyterlab.log").write_text(text)


def daemon_client(kernel_id: str) -> BlockingKernelClient:
    """A client straight to a kernel's ports, from what the daemon says about it."""
    info = dict(call_sync("info", autostart=False, kernel_id=kernel_id)["connection_info"])
    info["key"] = info["key"].encode()
    info.pop("kernel_name", None)
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    # No heartbeat: without a kernel manager, wait_for_ready takes a heartbeat not yet
    # answered for a dead kernel; a kernel_info round trip is the readiness test here.
    kc.start_channels(hb=False)
    msg_id = kc.kernel_info()
    deadline = time.monotonic() + KERNEL_START_TIMEOUT_S
    while kc.get_shell_msg(timeout=max(1.0, deadline - time.monotonic()))["parent_header"].get("msg_id") != msg_id:
        pass
    return kc


def test_server_extension_branches_and_refuses_bad_input(lab_server: LabServer) -> None:
    status, model = lab_server.api("POST", "api/kernels", {"name": "forkvm"})
    assert status == 201, model
    source_id = model["id"]
    kc_a = kc_b = None
    try:
        kc_a = daemon_client(source_id)
        run(kc_a, "x = 42")

        status, branch = lab_server.api("POST", f"api/forkvm/kernels/{source_id}/branch")
        assert status == 201, branch
        assert branch["name"] == "forkvm" and branch["id"] != source_id
        assert branch["forkvm"]["parent"] == source_id and branch["forkvm"]["source_pause_s"] >= 0
        assert branch["id"] in {k["id"] for k in lab_server.api("GET", "api/kernels")[1]}  # the server owns it
        kc_b = daemon_client(branch["id"])
        assert run(kc_b, "print(x)").strip() == "42"

        # Not authenticated.
        status, body = lab_server.api("POST", f"api/forkvm/kernels/{source_id}/branch", token=False)
        assert status == 403, body
        # Unknown kernel id.
        status, body = lab_server.api("POST", f"api/forkvm/kernels/{uuid.uuid4()}/branch")
        assert status == 404 and "no kernel" in body["message"], body
        # An ordinary python3 kernel.
        status, model = lab_server.api("POST", "api/kernels", {"name": "python3"})
        assert status == 201, model
        status, body = lab_server.api("POST", f"api/forkvm/kernels/{model['id']}/branch")
        assert status == 400 and "not a forkvm kernel" in body["message"], body
        assert lab_server.api("DELETE", f"api/kernels/{model['id']}")[0] == 204
        # A dead kernel (its VM killed; the server has not been told).
        kc_a.stop_channels()
        kc_a = None
        call_sync("kill", autostart=False, kernel_id=source_id)
        started = time.monotonic()
        status, body = lab_server.api("POST", f"api/forkvm/kernels/{source_id}/branch")
        assert status == 409 and "dead" in body["message"], body
        assert time.monotonic() - started < 30
        # The branch does not care.
        assert run(kc_b, "print(x + 1)").strip() == "43"
    finally:
        for kc in (kc_a, kc_b):
            if kc is not None:
                kc.stop_channels()
        for kernel in lab_server.api("GET", "api/kernels")[1]:
            lab_server.api("DELETE", f"api/kernels/{kernel['id']}")


def test_jupyterlab_branch_kernel_command(lab_server: LabServer, artifacts_dir: Path) -> None:
    """In headless Chromium: run `x = 6*7`, click "Branch", run `print(x)` in the copy: 42."""
    import nbformat
    from playwright.sync_api import sync_playwright

    # The cells are in the file, so the test clicks and runs instead of typing: keystrokes sent
    # while a loaded host is still laying out the notebook can land before the editor has focus.
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "forkvm", "display_name": "Python 3 (forkvm)", "language": "python"}
    notebook.cells += [nbformat.v4.new_code_cell("x = 6*7"), nbformat.v4.new_code_cell("print(x)")]
    nbformat.write(notebook, lab_server.root / "demo.ipynb")

    ui_timeout_ms = 1000 * (KERNEL_START_TIMEOUT_S + BRANCH_TIMEOUT_S)
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"],
        )  # fmt: skip
        page = browser.new_page(viewport={"width": 1400, "height": 850})
        try:
            page.set_default_timeout(ui_timeout_ms)
            page.goto(f"{lab_server.url}lab/tree/demo.ipynb?token={lab_server.token}")

            def panel(name: str):  # type: ignore[no-untyped-def]
                tab = page.locator(".lm-TabBar-tab", has_text=name).first
                tab.wait_for()
                return page.locator(f"#{tab.get_attribute('data-id')}")

            def run_cell(notebook_panel, index: int) -> None:  # type: ignore[no-untyped-def]
                # The toolbar's execution indicator says "idle" before the kernel is connected, and
                # Lab drops a run requested then; the status bar names the kernel once it is.
                page.locator(".jp-StatusBar-Widget", has_text="Python 3 (forkvm) | Idle").wait_for()
                notebook_panel.locator(".jp-Cell .jp-InputArea-editor").nth(index).click()
                page.keyboard.press("Shift+Enter")

            source = panel("demo.ipynb")
            run_cell(source, 0)
            source.locator(".jp-InputArea-prompt", has_text="[1]:").wait_for()

            source.locator(".jp-forkvm-BranchButton").click()
            branch = panel("demo-branch-1.ipynb")
            run_cell(branch, 1)
            output = branch.locator(".jp-OutputArea-output", has_text="42")
            output.wait_for()
            page.wait_for_timeout(500)
            page.screenshot(path=str(artifacts_dir / "jupyterlab_branch.png"))
            assert output.inner_text().strip() == "42"
        except Exception:
            page.screenshot(path=str(artifacts_dir / "jupyterlab_branch_failure.png"))
            raise
        finally:
            browser.close()
    assert (lab_server.root / "demo-branch-1.ipynb").exists()
    # The server owns both kernels, and the copy's session is bound to the branch.
    sessions = {s["path"]: s["kernel"]["id"] for s in lab_server.api("GET", "api/sessions")[1]}
    assert sessions["demo.ipynb"] != sessions["demo-branch-1.ipynb"]
    entry = next(k for k in call_sync("list", autostart=False) if k["kernel_id"] == sessions["demo-branch-1.ipynb"])
    assert entry["parent"] == sessions["demo.ipynb"]
