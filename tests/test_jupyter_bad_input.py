"""Issue 4: the provider under bad input: no daemon, a stale socket, a missing or damaged
template, and malformed requests on the daemon socket. Every case must end in a clear error
(or a transparent recovery) and leave no VM or kernel behind."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import KernelManager

import tests.vm_helpers as vh

from kernelprovider import paths
from kernelprovider.daemon_client import DaemonError, call_sync, daemon_running
from tests.jupyter_support import (
    TEMPLATE_NAME,
    daemon_kernels,
    daemon_pid,
    pid_alive,
    qemu_children,
    wait_until,
)

pytestmark = pytest.mark.slow


# --- a daemon of its own for the start-up cases ---------------------------------------------
@pytest.fixture
def fresh_runtime(forkvm_template: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty runtime directory (no daemon, no socket); any daemon started in it is stopped
    at the end, and the VMs it made must die with it."""
    runtime = Path(f"/tmp/forkvm-test-{uuid.uuid4().hex[:8]}")  # short: sun_path holds 108 bytes
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("FORKVM_RUNTIME_DIR", str(runtime))
    try:
        yield runtime
    finally:
        pid = daemon_pid()
        if pid is not None:
            children = qemu_children(pid)
            call_sync("stop", autostart=False)
            assert wait_until(lambda: not pid_alive(pid), 60), f"daemon {pid} did not stop"
            leftovers = [p for p in children if wait_until(lambda p=p: not pid_alive(p), 10) is False]
            assert not leftovers, f"QEMU processes {leftovers} outlived their daemon"
        shutil.rmtree(runtime, ignore_errors=True)


def test_daemon_autostarts_when_socket_missing(fresh_runtime: Path) -> None:
    socket_path = fresh_runtime / "daemon.sock"
    assert not socket_path.exists()
    result = subprocess.run(
        ["forkvm", "template", "list"], capture_output=True, text=True, env=dict(os.environ), timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert TEMPLATE_NAME in result.stdout
    assert daemon_running(socket_path)
    assert daemon_pid() is not None


def test_daemon_starts_over_stale_socket(fresh_runtime: Path) -> None:
    socket_path = fresh_runtime / "daemon.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(socket_path))  # a socket file nobody listens on, as a crashed daemon leaves it
    dead.close()
    assert socket_path.exists() and not daemon_running(socket_path)
    status = call_sync("status")
    assert status["pid"] == daemon_pid()
    assert daemon_running(socket_path)


def _daemons_serving(runtime: Path) -> list[int]:
    """Daemon processes started for `runtime` (found by the FORKVM_RUNTIME_DIR they inherited)."""
    wanted = f"FORKVM_RUNTIME_DIR={runtime}".encode()
    found = []
    for entry in os.listdir("/proc"):
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            if b"daemon\0run" in cmdline and wanted in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_two_daemon_starts_at_once_leave_one_daemon(fresh_runtime: Path) -> None:
    starts = [
        subprocess.Popen(["forkvm", "daemon", "start"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in starts]
    assert all(p.returncode == 0 for p in starts), outputs
    assert wait_until(lambda: len(_daemons_serving(fresh_runtime)) == 1, 30), (_daemons_serving(fresh_runtime), outputs)
    assert _daemons_serving(fresh_runtime) == [daemon_pid()]


def test_kernel_ended_without_release_is_listed_then_forgotten(
    fresh_runtime: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`jupyter console` ends its kernel with a shutdown_request alone and never releases it:
    the daemon lists it as ended for ended_kernel_retention_s (read here from the config file an
    autostarted daemon finds in the Jupyter config directory), then forgets it."""
    config_dir = tmp_path / "jupyter-config"
    config_dir.mkdir()
    settings = {"ended_kernel_retention_s": 3, "pool_size": 0, "prewarm": []}
    (config_dir / "forkvm_config.json").write_text(json.dumps({"ForkvmDaemon": settings}))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))

    result = call_sync("launch", template=TEMPLATE_NAME, pool_size=0)
    kernel_id = result["kernel_id"]
    info = result["connection_info"]
    client = vh.make_client({k: v for k, v in info.items() if k.endswith("_port")}, info["key"].encode())
    try:
        client.shutdown()
        assert wait_until(lambda: call_sync("poll", kernel_id=kernel_id)["status"] is not None, 60)
    finally:
        vh.close_client(client)
    ended = daemon_kernels()
    assert [(k["kernel_id"], k["status"]) for k in ended] == [(kernel_id, 0)], ended
    assert ended[0]["end_reason"], ended
    assert wait_until(lambda: daemon_kernels() == [], 30), daemon_kernels()
    with pytest.raises(DaemonError, match="no forkvm kernel"):
        call_sync("poll", kernel_id=kernel_id)
    assert qemu_children() == set()


@pytest.mark.usefixtures("forkvm_template")
def test_two_launches_of_one_kernel_id_start_one_kernel() -> None:
    kernel_id = f"dup-{uuid.uuid4().hex[:8]}"
    results: list[Any] = []

    def launch() -> None:
        try:
            results.append(call_sync("launch", template=TEMPLATE_NAME, kernel_id=kernel_id))
        except DaemonError as exc:
            results.append(exc)

    threads = [threading.Thread(target=launch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    try:
        errors = [str(r) for r in results if isinstance(r, DaemonError)]
        assert len(results) == 2 and len(errors) == 1, results
        assert "being started" in errors[0] or "already exists" in errors[0], errors
        assert [k["kernel_id"] for k in daemon_kernels()].count(kernel_id) == 1
    finally:
        call_sync("release", kernel_id=kernel_id)


# --- templates that are missing or damaged ---------------------------------------------------
def _forkvm_kernel_manager(**provisioner_config: Any) -> KernelManager:
    km = KernelManager(kernel_name="forkvm")
    km.kernel_spec.metadata["kernel_provisioner"]["config"] = {
        **km.kernel_spec.metadata["kernel_provisioner"].get("config", {}),
        **provisioner_config,
    }
    return km


def _qemu_using(template_dir: Path) -> list[int]:
    """Daemon-owned QEMU processes whose RAM comes from `template_dir`."""
    found = []
    for pid in qemu_children():
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if f"mem-path={template_dir}/" in cmdline:
            found.append(pid)
    return found


def test_missing_template_clear_error(forkvm_template: str) -> None:
    name = f"nope-{uuid.uuid4().hex[:8]}"
    km = _forkvm_kernel_manager(template=name, auto_build_template=False)
    with pytest.raises(DaemonError) as raised:
        km.start_kernel()
    message = str(raised.value)
    assert f"no template named {name!r}" in message
    assert f"forkvm template build {name}" in message
    assert km.kernel_id not in {k["kernel_id"] for k in daemon_kernels()}

    # The daemon API says the same, and keeps no warm pool retrying a template that is not there.
    with pytest.raises(DaemonError, match="forkvm template build nope"):
        call_sync("launch", template="nope")
    pools = call_sync("status", autostart=False)["pools"]
    assert name not in pools and "nope" not in pools


@pytest.fixture
def broken_template(forkvm_template: str) -> Iterator[str]:
    """A copy of the default template whose device state file is cut short."""
    root = paths.template_root("qemu")
    source = root / forkvm_template
    name = f"broken-{uuid.uuid4().hex[:8]}"
    target = root / name
    target.mkdir()
    try:
        os.link(source / "memory.img", target / "memory.img")  # never written: sharing is safe
        state = (source / "state.bin").read_bytes()
        (target / "state.bin").write_bytes(state[: len(state) // 3])
        record = json.loads((source / "template.json").read_text())
        record["name"] = name
        (target / "template.json").write_text(json.dumps(record))
        yield name
    finally:
        shutil.rmtree(target, ignore_errors=True)


def test_vm_that_fails_to_start_leaves_nothing(broken_template: str) -> None:
    template_dir = paths.template_root("qemu") / broken_template
    km = _forkvm_kernel_manager(template=broken_template, auto_build_template=False)
    with pytest.raises(DaemonError) as raised:
        km.start_kernel()
    message = str(raised.value)
    assert f"restoring template {broken_template!r} failed" in message, message
    assert f"forkvm template build --force {broken_template}" in message, message
    assert not km.has_kernel
    assert km.kernel_id not in {k["kernel_id"] for k in daemon_kernels()}
    # No VM of the broken template is left, and none is being retried behind our back.
    assert wait_until(lambda: not _qemu_using(template_dir), 10), _qemu_using(template_dir)
    assert broken_template not in call_sync("status", autostart=False)["pools"]
    time.sleep(6)  # longer than the warm pool's retry interval
    assert not _qemu_using(template_dir)


# --- malformed requests on the daemon socket ----------------------------------------------------
class RawConnection:
    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(paths.daemon_socket()))
        self.stream = self.sock.makefile("rb")

    def send(self, payload: bytes) -> None:
        self.sock.sendall(payload)

    def reply(self) -> dict[str, Any] | None:
        line = self.stream.readline()
        return json.loads(line) if line else None

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


MALFORMED = [
    (b"\x00\xff\xfe\x80\x81 garbage\n", None, "not JSON"),
    (b"hello daemon\n", None, "not JSON"),
    (b"\n", None, "not JSON"),
    (b"[1, 2, 3]\n", None, "must be a JSON object"),
    (b'"launch"\n', None, "must be a JSON object"),
    (b'{"id": 7, "method": "no_such_method", "params": {}}\n', 7, "unknown method 'no_such_method'"),
    (b'{"id": 8}\n', 8, "unknown method None"),
    (b'{"id": 9, "method": 42}\n', 9, "unknown method 42"),
    (b'{"id": 10, "method": "poll"}\n', 10, "no forkvm kernel None"),
    (b'{"id": 11, "method": "template_rm", "params": {}}\n', 11, "bad request"),
    (b'{"id": 12, "method": "signal", "params": {"kernel_id": "not-a-kernel"}}\n', 12, "no forkvm kernel"),
    (b'{"id": 13, "method": "status", "params": [1, 2]}\n', 13, "params must be a JSON object"),
    (b'{"id": 14, "method": "launch", "params": {"pool_size": "lots"}}\n', 14, "pool_size must be"),
    # A pool is VMs: no request may ask for an unbounded one.
    (b'{"id": 20, "method": "launch", "params": {"pool_size": 100000}}\n', 20, "pool_size must be"),
    (b'{"id": 21, "method": "launch", "params": {"pool_size": 1e400}}\n', 21, "pool_size must be"),
    (b'{"id": 22, "method": "launch", "params": {"kernel_id": "a/b"}}\n', 22, "a kernel id is"),
    (b'{"id": 23, "method": "branch", "params": {"kernel_id": "x", "connection_dir": "/proc"}}\n', 23, "no forkvm kernel"),
    # What a restart may ask to keep is checked before any VM is touched.
    (b'{"id": 15, "method": "launch", "params": {"key": "short"}}\n', 15, "key must be"),
    (b'{"id": 16, "method": "launch", "params": {"key": "' + b"k" * 64 + b'\\n"}}\n', 16, "key must be"),
    (b'{"id": 17, "method": "launch", "params": {"ports": {"shell_port": 5000}}}\n', 17, "ports must name"),
    (
        b'{"id": 18, "method": "launch", "params": {"ports": {"shell_port": 22, "iopub_port": 5001, '
        b'"stdin_port": 5002, "control_port": 5003, "hb_port": 5004}}}\n',
        18,
        "shell_port must be a port number",
    ),
    (
        b'{"id": 19, "method": "launch", "params": {"ports": {"shell_port": 5000, "iopub_port": 5000, '
        b'"stdin_port": 5002, "control_port": 5003, "hb_port": 5004}}}\n',
        19,
        "five different",
    ),
]


@pytest.mark.usefixtures("forkvm_template")
def test_malformed_requests_get_errors_and_daemon_keeps_serving() -> None:
    pid = call_sync("status")["pid"]
    conn = RawConnection()
    try:
        for payload, expected_id, expected_error in MALFORMED:
            conn.send(payload)
            answer = conn.reply()
            assert answer is not None, f"the daemon hung up on {payload!r}"
            assert "result" not in answer, (payload, answer)
            assert expected_error in answer.get("error", ""), (payload, answer)
            assert answer.get("id") == expected_id, (payload, answer)
        # The same connection still serves well-formed requests.
        conn.send(b'{"id": 100, "method": "status", "params": {}}\n')
        answer = conn.reply()
        assert answer is not None and answer["id"] == 100 and answer["result"]["pid"] == pid
    finally:
        conn.close()
    assert call_sync("status", autostart=False)["pid"] == pid


@pytest.mark.usefixtures("forkvm_template")
def test_huge_request_line_is_refused_and_daemon_keeps_serving() -> None:
    pid = call_sync("status")["pid"]
    conn = RawConnection()
    huge = b'{"id": 1, "method": "status", "params": {"pad": "' + b"x" * (3 << 20) + b'"}}\n'
    send_error: list[BaseException] = []

    def sender() -> None:
        try:
            conn.send(huge)
        except OSError as exc:  # the daemon may hang up before it has read everything
            send_error.append(exc)

    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    try:
        answer = conn.reply()
        assert answer is not None and "too large" in answer.get("error", ""), answer
        thread.join(60)
        assert not thread.is_alive()
    finally:
        conn.close()
    status = call_sync("status", autostart=False)
    assert status["pid"] == pid
    assert daemon_pid() == pid
