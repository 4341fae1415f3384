"""A minimal asynchronous QMP client over an already-connected socket."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from vmcore.errors import EngineError


class QmpError(EngineError):
    pass


class QmpClient:
    def __init__(self, sock: socket.socket, name: str) -> None:
        self._sock = sock
        self.name = name
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._lock = asyncio.Lock()
        self.events: list[dict[str, Any]] = []

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self._sock, limit=1 << 20)
        greeting = await self._read()
        if "QMP" not in greeting:
            raise QmpError(f"{self.name}: not a QMP greeting: {greeting}")
        await self.execute("qmp_capabilities")

    async def execute(self, command: str, *, pass_fd: int | None = None, **arguments: Any) -> Any:
        """Run a QMP command; `pass_fd` travels with it as SCM_RIGHTS (for `getfd`)."""
        if self._writer is None:
            raise QmpError(f"{self.name}: QMP is not connected")
        request: dict[str, Any] = {"execute": command}
        if arguments:
            request["arguments"] = arguments
        line = json.dumps(request).encode() + b"\n"
        async with self._lock:
            try:
                if pass_fd is None:
                    self._writer.write(line)
                    await self._writer.drain()
                else:
                    # Nothing else is queued (the lock is held and every write drained), so the
                    # raw socket can take this line and its fd in one sendmsg.
                    socket.send_fds(self._sock, [line], [pass_fd])
            except (ConnectionError, BlockingIOError) as exc:
                raise QmpError(f"{self.name}: QEMU closed its QMP connection ({exc})") from exc
            while True:
                message = await self._read()
                if "event" in message:
                    self.events.append(message)
                    continue
                if "error" in message:
                    raise QmpError(f"{self.name}: {command}: {message['error'].get('desc', message['error'])}")
                return message.get("return")

    async def _read(self) -> dict[str, Any]:
        assert self._reader is not None
        try:
            line = await self._reader.readline()
        except ConnectionError as exc:  # QEMU exited (e.g. it rejected a state file) with data in flight
            raise QmpError(f"{self.name}: QEMU closed its QMP connection ({exc})") from exc
        if not line:
            raise QmpError(f"{self.name}: QEMU closed its QMP connection")
        return json.loads(line)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        else:
            self._sock.close()
