"""Host-side ports of a forked kernel: each one forwards ZMQ connections into the guest.

For each kernel channel (shell, iopub, stdin, control, hb) the bridge listens on an ephemeral
port of 127.0.0.1. Each accepted TCP connection becomes one GuestStream to the same channel's
port inside the guest, and ZMTP bytes flow through unchanged both ways: nothing here decodes
ZMQ frames or Jupyter messages, so signatures are checked by the kernel itself with its key.
"""

from __future__ import annotations

import asyncio
import logging

from vmcore.agent_protocol import GUEST_KERNEL_PORTS
from vmcore.errors import GuestError
from vmcore.guest_link import GuestLink, splice

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 18


class KernelPortBridge:
    def __init__(self, link: GuestLink, name: str, host: str = "127.0.0.1") -> None:
        self._link = link
        self._name = name
        self._host = host
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        self.ports: dict[str, int] = {}

    async def start(self, ports: dict[str, int] | None = None) -> dict[str, int]:
        """Listen on one port per channel, the given ones or ephemeral ones; returns
        {"shell_port": ..., ...}. Raises OSError, listening on none, if a given port is taken."""
        try:
            for channel, guest_port in GUEST_KERNEL_PORTS.items():
                name = f"{channel}_port"
                server = await asyncio.start_server(
                    lambda r, w, p=guest_port: self._accept(r, w, p),
                    self._host,
                    (ports or {}).get(name, 0),
                    limit=READ_CHUNK,
                )
                self._servers.append(server)
                self.ports[name] = server.sockets[0].getsockname()[1]
        except OSError:
            await self.close()
            self.ports.clear()
            raise
        return dict(self.ports)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        for server in self._servers:
            await server.wait_closed()
        if self._connections:
            await asyncio.gather(*self._connections, return_exceptions=True)
        self._servers.clear()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int) -> None:
        task = asyncio.ensure_future(self._forward(reader, writer, guest_port))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, guest_port: int) -> None:
        try:
            stream = await self._link.open_stream(guest_port)
        except (GuestError, asyncio.TimeoutError) as exc:
            # Normal while a kernel shuts down: clients reconnect until their channels close.
            log.debug("%s: cannot reach guest port %d: %s", self._name, guest_port, exc)
            writer.close()
            return
        await splice(reader, writer, stream)
