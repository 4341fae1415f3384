"""Egress by allow-list, without a network interface.

For each host:port the host allows, the agent listens on that same address inside the guest
(adding the address to `lo` when it is not a loopback one) and hands every connection to the
host as a CONNECT stream; the host connects on only if the pair is on its own list. Nothing else
leaves the VM: it has no NIC.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import subprocess

from forkvm_agent.agent_protocol import GUEST_KERNEL_PORTS
from forkvm_agent.stream_mux import StreamMux

log = logging.getLogger(__name__)

Target = tuple[str, int]


def parse_targets(raw: object) -> set[Target]:
    if not isinstance(raw, list):
        raise ValueError("egress must be a list of [host, port] pairs")
    targets = set()
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[1], int)):
            raise ValueError(f"bad egress entry {item!r}")
        host = str(ipaddress.ip_address(item[0]))  # literal addresses only: the guest has no DNS
        port = item[1]
        if not 0 < port < 65536 or (ipaddress.ip_address(host).is_loopback and port in GUEST_KERNEL_PORTS.values()):
            raise ValueError(f"egress port {port} is not usable")
        targets.add((host, port))
    return targets


class EgressListeners:
    def __init__(self, mux: StreamMux) -> None:
        self._mux = mux
        self._servers: dict[Target, asyncio.base_events.Server] = {}

    async def apply(self, targets: set[Target]) -> None:
        for target in set(self._servers) - targets:
            self._servers.pop(target).close()
        for host, port in targets - set(self._servers):
            if not ipaddress.ip_address(host).is_loopback:
                subprocess.run(["ip", "addr", "add", f"{host}/32", "dev", "lo"], check=False, capture_output=True)
            self._servers[(host, port)] = await asyncio.start_server(
                lambda r, w, h=host, p=port: self._mux.connect_out(r, w, h, p), host, port
            )
            log.info("egress allowed to %s:%d", host, port)
