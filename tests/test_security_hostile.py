"""Issue 7, item 8: hostile clients on a kernel's host ports and on the daemon's socket.

Each of a kernel's five host ports gets raw TCP connections carrying random bytes, truncated
ZMTP greetings and frames, oversized frame lengths and idle half-open connections; the daemon
gets malformed API requests. Afterwards the kernel still answers kernel_info and runs cells,
and the daemon still answers `status`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path

import pytest

from kernelprovider import paths
from kernelprovider.daemon_client import call_sync
from tests.security_support import assert_usable, client, daemon_kernel, forkvm_kernel, wait_until

pytestmark = [pytest.mark.slow]

CHANNELS = ("shell", "iopub", "stdin", "control", "hb")


def _greeting(mechanism: bytes = b"NULL") -> bytes:
    """A complete ZMTP 3.0 greeting (64 bytes)."""
    return b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _ready_command() -> bytes:
    body = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", 6) + b"DEALER"
    return b"\x04" + bytes([len(body)]) + body


HOSTILE_PAYLOADS = {
    "random_bytes": os.urandom(64 * 1024),
    "truncated_greeting": _greeting()[:11],
    "greeting_wrong_version": b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x63\x00" + b"\x00" * 52,
    "greeting_unknown_mechanism": _greeting(b"KERBEROS-NOPE"),
    "truncated_ready": _greeting() + _ready_command()[:9],
    "huge_frame_length": _greeting() + _ready_command() + b"\x02" + struct.pack(">Q", 1 << 62) + b"\x00" * 100,
    "truncated_message": _greeting() + _ready_command() + b"\x01\x00" + b"\x03" + struct.pack(">Q", 4096) + b"{",
    "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


def _attack(port: int, payload: bytes, linger_rst: bool) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(payload)
        except OSError:
            pass  # the other end may already have hung up on us: fine
        if linger_rst:
            # Close with RST instead of FIN: an abrupt disconnect mid-stream.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@pytest.mark.timeout(1200)
def test_garbage_on_every_kernel_port_leaves_the_kernel_working(forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (km, kc):
        assert_usable(kc, 1)
        ports = daemon_kernel(km.kernel_id)["ports"]
        idle = []
        for channel in CHANNELS:
            port = ports[f"{channel}_port"]
            for index, payload in enumerate(HOSTILE_PAYLOADS.values()):
                _attack(port, payload, linger_rst=bool(index % 2))
            # A connection that says nothing and stays open for the rest of the test.
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        try:
            # The client connected before the attack still works...
            assert_usable(kc, 2)
            # ...and so does a new one.
            kc.stop_channels()
            kc2 = client(km)
            try:
                assert_usable(kc2, 3)
                hb = kc2.hb_channel
                hb.start()
                assert wait_until(hb.is_beating, 60, interval=0.5), "heartbeat no longer answered"
            finally:
                kc2.stop_channels()
        finally:
            for sock in idle:
                sock.close()
        assert km.is_alive()
        assert call_sync("status", autostart=False)["kernels"] >= 1


def _raw_request(line: bytes, timeout: float = 120.0) -> dict | None:
    """Send raw bytes to the daemon's socket; its answer as JSON, or None if it hung up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(paths.daemon_socket()))
        try:
            sock.sendall(line)
            sock.shutdown(socket.SHUT_WR)  # EOF after the request, newline or not
        except OSError:
            return None
        data = b""
        while not data.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            data += chunk
    if not data:
        return None
    return json.loads(data.splitlines()[-1])


@pytest.mark.timeout(1200)
def test_malformed_daemon_requests_are_refused(forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (km, kc):
        kernel_id = km.kernel_id
        requests: list[bytes] = [
            b"not json\n",
            b"\xff\xfe\xfd\n",
            b"[1, 2, 3]\n",
            b'"launch"\n',
            b"{}\n",
            b'{"id": 1, "method": 5}\n',
            b'{"id": 2, "method": "no_such_method"}\n',
            b'{"id": 3, "method": "__init__"}\n',
            b'{"id": 4, "method": "launch", "params": [1, 2]}\n',
            b'{"id": 5, "method": "poll", "params": {"kernel_id": {"nested": true}}}\n',
            b'{"id": 6, "method": "poll", "params": {"kernel_id": "no-such-kernel"}}\n',
            json.dumps({"id": 7, "method": "signal", "params": {"kernel_id": kernel_id, "signum": "nine"}}).encode() + b"\n",
            json.dumps({"id": 8, "method": "signal", "params": {"kernel_id": kernel_id}}).encode() + b"\n",
            # A signal the agent refuses to deliver (SIGSTOP would freeze the kernel).
            json.dumps({"id": 9, "method": "signal", "params": {"kernel_id": kernel_id, "signum": 19}}).encode() + b"\n",
            json.dumps({"id": 10, "method": "signal", "params": {"kernel_id": kernel_id, "signum": 10**30}}).encode() + b"\n",
            b'{"id": 11, "method": "launch", "params": {"template": "../../../etc/passwd"}}\n',
            b'{"id": 12, "method": "launch", "params": {"template": "default", "pool_size": "many"}}\n',
            b'{"id": 13, "method": "template_rm", "params": {"name": "../no-such-dir-forkvm-security"}}\n',
            b'{"id": 14, "method": "template_rm", "params": {}}\n',
            b'{"id": 15, "method": "template_build", "params": {"name": "../escape", "egress": ["nonsense"]}}\n',
            b'{"id": 16, "method": "template_build", "params": {"name": "x", "egress": ["127.0.0.1:99999"]}}\n',
            b'{"id": 17, "method": "branch", "params": {"kernel_id": 12}}\n',
            b'{"id": 18, "method": "wait", "params": {"kernel_id": "' + kernel_id.encode() + b'", "timeout": "soon"}}\n',
            b'{"id": 19, "method": "status", "params": {"extra": "' + b"A" * 1000 + b'"}}\n',
            b'{"id": 20, "method": "status"' + b" " * 100 + b"\n",  # truncated JSON
            b"\n",
            b"{" * 10000 + b"\n",  # deep nesting
            b"A" * (2 << 20) + b"\n",  # past the 1 MiB request limit
            b'{"id": 21, "method": "status"}',  # no newline, then EOF
        ]
        running_before = {k["kernel_id"] for k in call_sync("list", autostart=False) if k["status"] is None}
        for line in requests:
            answer = _raw_request(line)
            shown = line[:80]
            if answer is not None and line.strip() and b"status" not in line[:40]:
                assert "error" in answer, f"{shown!r} was accepted: {answer}"
            # After every request the daemon still serves, and the kernel still runs.
            status = call_sync("status", autostart=False)
            assert status["kernels"] >= 1, (shown, status)
        assert km.is_alive()
        assert_usable(kc, 4)
        # None of it created or removed a template or a kernel.
        names = {t["name"] for t in call_sync("template_list", autostart=False)}
        assert forkvm_template in names and "escape" not in names and "x" not in names
        assert not (Path(paths.cache_dir()) / "templates" / "escape").exists()
        running_after = {k["kernel_id"] for k in call_sync("list", autostart=False) if k["status"] is None}
        assert kernel_id in running_after and running_after <= running_before
