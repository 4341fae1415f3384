"""Guest side of the host's byte streams: each one is a TCP connection to a kernel port.

Bytes pass through untouched; the agent never decodes ZMQ frames or Jupyter messages.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from forkvm_agent.agent_protocol import (
    GUEST_KERNEL_PORTS,
    GUEST_STREAM_BASE,
    FrameType,
    encode,
    encode_data,
    encode_json,
)

log = logging.getLogger(__name__)

Send = Callable[[bytes], Awaitable[None]]
READ_CHUNK = 1 << 18
ALLOWED_PORTS = frozenset(GUEST_KERNEL_PORTS.values())


class StreamMux:
    def __init__(self, send: Send) -> None:
        self._send = send
        self._writers: dict[int, asyncio.StreamWriter] = {}
        self._pumps: dict[int, asyncio.Task[None]] = {}
        self._connecting: dict[int, asyncio.Future[None]] = {}
        self._next_guest_stream = GUEST_STREAM_BASE

    async def connect_out(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int) -> None:
        """A guest program connected to an egress listener: ask the host to connect it on."""
        stream_id = self._next_guest_stream
        self._next_guest_stream = GUEST_STREAM_BASE + (stream_id + 1 - GUEST_STREAM_BASE) % GUEST_STREAM_BASE
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._connecting[stream_id] = answered
        self._writers[stream_id] = writer
        await self._send(encode_json(FrameType.CONNECT, {"host": host, "port": port}, stream_id))
        try:
            await asyncio.wait_for(answered, 15)
        except (asyncio.TimeoutError, ConnectionRefusedError):
            await self.close(stream_id)
            return
        finally:
            self._connecting.pop(stream_id, None)
        self._pumps[stream_id] = asyncio.ensure_future(self._pump_to_host(stream_id, reader))

    def opened(self, stream_id: int) -> None:
        answered = self._connecting.get(stream_id)
        if answered is not None and not answered.done():
            answered.set_result(None)

    async def open(self, stream_id: int, port: object) -> None:
        if not 0 < stream_id < GUEST_STREAM_BASE or stream_id in self._writers:
            await self._refuse(stream_id, f"stream id {stream_id} is invalid or in use")
            return
        if not isinstance(port, int) or port not in ALLOWED_PORTS:
            await self._refuse(stream_id, f"port {port!r} is not a kernel port")
            return
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=READ_CHUNK)
        except OSError as exc:
            await self._refuse(stream_id, f"connect to port {port}: {exc}")
            return
        self._writers[stream_id] = writer
        await self._send(encode(FrameType.OPENED, b"", stream_id))
        self._pumps[stream_id] = asyncio.ensure_future(self._pump_to_host(stream_id, reader))

    async def data(self, stream_id: int, payload: bytes) -> None:
        writer = self._writers.get(stream_id)
        if writer is None:
            await self._send(encode_json(FrameType.ERROR, {"message": f"DATA for unknown stream {stream_id}"}))
            return
        writer.write(payload)
        try:
            await writer.drain()
        except ConnectionError:
            await self.close(stream_id, notify_host=True)

    async def close(self, stream_id: int, notify_host: bool = False) -> None:
        answered = self._connecting.get(stream_id)
        if answered is not None and not answered.done():
            answered.set_exception(ConnectionRefusedError(f"host refused stream {stream_id}"))
        writer = self._writers.pop(stream_id, None)
        pump = self._pumps.pop(stream_id, None)
        if pump is not None and pump is not asyncio.current_task():
            pump.cancel()
        if writer is not None:
            writer.close()
            if notify_host:
                await self._send(encode(FrameType.CLOSE, b"", stream_id))

    async def close_all(self) -> None:
        for stream_id in list(self._writers):
            await self.close(stream_id)

    async def _refuse(self, stream_id: int, message: str) -> None:
        log.warning("refused stream %d: %s", stream_id, message)
        await self._send(encode_json(FrameType.CLOSE, {"reason": message}, stream_id))

    async def _pump_to_host(self, stream_id: int, reader: asyncio.StreamReader) -> None:
        try:
            while chunk := await reader.read(READ_CHUNK):
                for frame in encode_data(stream_id, chunk):
                    await self._send(frame)
        except ConnectionError:
            pass
        if stream_id in self._writers:
            await self.close(stream_id, notify_host=True)
