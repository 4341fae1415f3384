"""Issue 7, item 4: a guest has no network unless its template allows named host:port pairs.

By default a guest has only `lo`, so a connection to a server the test runs on the host's
127.0.0.1 lands on the guest's own loopback and is refused at once. A template built with
`--allow-egress 127.0.0.1:PORT` (here through the daemon's template_build API, which the CLI
option feeds) lets the guest reach exactly that server, and still no other port.
All traffic in these tests stays on 127.0.0.0/8.
"""

from __future__ import annotations

import http.server
import socket
import threading
import uuid
from collections.abc import Iterator

import pytest

from kernelprovider.daemon_client import call_sync
from tests.security_support import evaluate, forkvm_kernel

pytestmark = [pytest.mark.slow]

EGRESS_TEMPLATE = "sec-egress"
BODY = f"forkvm egress ok {uuid.uuid4().hex}".encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server API
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_servers() -> Iterator[tuple[int, int]]:
    """Two HTTP servers on the host's 127.0.0.1: (allowed port, other port)."""
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler) for _ in range(2)]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield servers[0].server_address[1], servers[1].server_address[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


CONNECT = """
import errno, socket, time
def _connect(host, port, timeout=20.0):
    started = time.monotonic()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        outcome = "connected"
    except OSError as exc:
        outcome = errno.errorcode.get(exc.errno, type(exc).__name__) if exc.errno else type(exc).__name__
    return outcome, time.monotonic() - started
"""


def test_default_guest_has_only_loopback(forkvm_template: str, http_servers: tuple[int, int]) -> None:
    port, _ = http_servers
    # The server really is reachable from the host.
    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    with forkvm_kernel(forkvm_template) as (_, kc):
        assert evaluate(kc, "", "sorted(__import__('os').listdir('/sys/class/net'))") == ["lo"]
        outcome, seconds = evaluate(kc, CONNECT, f"_connect('127.0.0.1', {port})")
        assert outcome == "ECONNREFUSED" and seconds < 2.0, (outcome, seconds)
        # Anything off the loopback has no route at all (no interface carries it).
        outcome, seconds = evaluate(kc, "", "_connect('10.0.2.2', 80)")
        assert outcome == "ENETUNREACH" and seconds < 2.0, (outcome, seconds)
        routes = evaluate(kc, "", "open('/proc/net/route').read().splitlines()[1:]")
        assert routes == [], routes


@pytest.mark.timeout(1800)
def test_allow_egress_reaches_only_the_listed_port(forkvm_runtime: object, http_servers: tuple[int, int]) -> None:
    allowed, other = http_servers
    result = call_sync("template_build", name=EGRESS_TEMPLATE, egress=[f"127.0.0.1:{allowed}"])
    assert result["egress"] == [f"127.0.0.1:{allowed}"]
    with forkvm_kernel(EGRESS_TEMPLATE) as (_, kc):
        fetch = f"import urllib.request; _body = urllib.request.urlopen('http://127.0.0.1:{allowed}/x', timeout=60).read()"
        assert evaluate(kc, fetch, "_body") == BODY
        outcome, seconds = evaluate(kc, CONNECT, f"_connect('127.0.0.1', {other})")
        assert outcome == "ECONNREFUSED" and seconds < 2.0, (outcome, seconds)
        # Still no network interface: egress runs through the agent, not a NIC.
        assert evaluate(kc, "", "sorted(__import__('os').listdir('/sys/class/net'))") == ["lo"]
