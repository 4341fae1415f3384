"""Issue 4: JupyterLab with a forkvm kernel, driven by a real browser (Playwright + Debian's
chromium): open a notebook whose kernelspec is forkvm, run `print(6*7)`, see 42."""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest

from tests.jupyter_support import KERNEL_START_TIMEOUT_S, daemon_kernels, forkvm_env, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
UI_TIMEOUT_MS = 180_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    def __init__(self, root: Path, log_path: Path) -> None:
        self.root = root
        self.port = _free_port()
        self.token = secrets.token_hex(24)
        self.base = f"http://127.0.0.1:{self.port}"
        env = forkvm_env()
        config_dir = root.parent / "jupyter-config-dir"
        config_dir.mkdir(exist_ok=True)
        env["JUPYTER_CONFIG_DIR"] = str(config_dir)  # no user configuration in the way
        self._log = open(log_path, "wb")
        self.process = subprocess.Popen(
            ["jupyter", "lab", "--no-browser", f"--ServerApp.token={self.token}", f"--port={self.port}",
             "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}", "--ServerApp.port_retries=0", "--allow-root",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            f"{self.base}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            body = response.read()
        return json.loads(body) if body else None

    def wait_ready(self, timeout: float = 180) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.process.returncode}")
            try:
                self.api("GET", "/api/status")
                return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        assert wait_until(up, timeout, interval=0.5), "jupyter lab did not come up"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # stops the server and its kernels, no prompt
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture
def lab(tmp_path: Path, artifacts_dir: Path) -> Iterator[LabServer]:
    root = tmp_path / "root"
    root.mkdir()
    server = LabServer(root, tmp_path / "jupyterlab.log")
    try:
        server.wait_ready()
        yield server
    finally:
        try:
            for session in server.api("GET", "/api/sessions") if server.process.poll() is None else []:
                server.api("DELETE", f"/api/sessions/{session['id']}")
        finally:
            server.stop()
            shutil.copy(tmp_path / "jupyterlab.log", artifacts_dir / "jupyterlab.log")


def test_jupyterlab_runs_cell_in_forkvm_kernel(lab: LabServer, artifacts_dir: Path) -> None:
    from playwright.sync_api import sync_playwright

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(6*7)")])
    nb.metadata["kernelspec"] = {"name": "forkvm", "display_name": "Python 3 (forkvm)", "language": "python"}
    nbformat.write(nb, lab.root / "x.ipynb")

    screenshot = artifacts_dir / "jupyterlab_forkvm.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{lab.base}/lab/tree/x.ipynb?token={lab.token}", timeout=UI_TIMEOUT_MS)
            # The notebook panel, with our kernel's display name in its toolbar.
            page.locator(".jp-NotebookPanel .jp-Cell").first.wait_for(timeout=UI_TIMEOUT_MS)
            page.locator(".jp-NotebookPanel-toolbar", has_text="Python 3 (forkvm)").first.wait_for(
                timeout=UI_TIMEOUT_MS
            )
            # Wait until Lab reports the kernel connected and idle (the toolbar's execution indicator
            # says "idle" before the kernel is connected, and Lab drops a run requested then).
            page.locator(".jp-StatusBar-Widget", has_text="Python 3 (forkvm) | Idle").wait_for(
                timeout=KERNEL_START_TIMEOUT_S * 1000
            )
            page.locator(".jp-Cell .jp-InputArea-editor").first.click()
            page.keyboard.press("Shift+Enter")
            output = page.locator(".jp-OutputArea-output", has_text="42").first
            output.wait_for(timeout=UI_TIMEOUT_MS)
            assert output.inner_text().strip() == "42"
            page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(timeout=UI_TIMEOUT_MS)
            page.screenshot(path=str(screenshot))
        finally:
            browser.close()

    # The kernel Lab used is a forkvm kernel the test daemon runs.
    sessions = lab.api("GET", "/api/sessions")
    assert [s["kernel"]["name"] for s in sessions] == ["forkvm"], sessions
    kernel_id = sessions[0]["kernel"]["id"]
    assert kernel_id in {k["kernel_id"] for k in daemon_kernels()}
    assert screenshot.stat().st_size > 10_000

    # Closing the session shuts the kernel's VM down.
    lab.api("DELETE", f"/api/sessions/{sessions[0]['id']}")
    assert wait_until(lambda: kernel_id not in {k["kernel_id"] for k in daemon_kernels()}, 60)
