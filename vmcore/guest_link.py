"""Host side of the agent protocol (vmcore/agent_protocol.py) over one byte stream.

A GuestLink owns the channel's reader task. It multiplexes byte streams to ports on the
guest's loopback (GuestStream), runs the resume handshake, delivers signals and records the
kernel process's exit. The transport (virtio-serial, vsock) is the backend's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmcore.agent_protocol import (
    GUEST_STREAM_BASE,
    Frame,
    FrameReader,
    FrameType,
    ProtocolError,
    encode,
    encode_data,
    encode_json,
    resume_proof,
)
from vmcore.errors import GuestError

if TYPE_CHECKING:
    from vmcore.engine import ResumeParams

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 18
# Bytes a stream may hold for a slow host reader before the guest's channel waits for it: the
# guest can fill this much of the daemon's memory per stream, and no more.
STREAM_BUFFER_LIMIT = 16 << 20
# Drain the transport every this many bytes queued, so one busy stream cannot balloon memory.
DRAIN_THRESHOLD = 1 << 20


@dataclass(frozen=True)
class ResumeConfirmation:
    """The guest's answer to RESUME, checked against what was sent."""

    key_id: str
    urandom_digest: str
    clock_offset_s: float
    round_trip_s: float
    details: dict[str, Any]


class GuestStream:
    """One byte stream to a port on the guest's loopback."""

    def __init__(self, link: GuestLink, stream_id: int) -> None:
        self._link = link
        self.id = stream_id
        self._incoming: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._buffered = 0
        self._drained = asyncio.Event()
        self.closed = False

    async def read(self) -> bytes:
        """Next chunk from the guest; b"" once the stream is closed."""
        if self.closed and self._incoming.empty():
            return b""
        chunk = await self._incoming.get()
        if chunk:
            self._buffered -= len(chunk)
            if self._buffered <= STREAM_BUFFER_LIMIT // 2:
                self._drained.set()
        return chunk or b""

    async def write(self, data: bytes) -> None:
        if self.closed:
            raise ConnectionResetError(f"guest stream {self.id} is closed")
        await self._link._send_data(self.id, data)

    async def close(self) -> None:
        if not self.closed:
            self._closed_by_guest()
            await self._link._send(encode(FrameType.CLOSE, b"", self.id))
        self._link._streams.pop(self.id, None)

    async def _deliver(self, data: bytes) -> None:
        if self.closed:
            return
        self._incoming.put_nowait(data)
        self._buffered += len(data)
        if self._buffered > STREAM_BUFFER_LIMIT:
            self._drained.clear()
            await self._drained.wait()

    def _closed_by_guest(self) -> None:
        if not self.closed:
            self.closed = True
            self._incoming.put_nowait(None)
            self._drained.set()


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: GuestStream) -> None:
    """Copy bytes both ways between a host TCP connection and a guest stream until either ends."""

    async def host_to_guest() -> None:
        with contextlib.suppress(ConnectionError, GuestError):
            while chunk := await reader.read(READ_CHUNK):
                await stream.write(chunk)

    async def guest_to_host() -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await stream.read():
                writer.write(chunk)
                await writer.drain()

    directions = [asyncio.ensure_future(host_to_guest()), asyncio.ensure_future(guest_to_host())]
    try:
        await asyncio.wait(directions, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for direction in directions:
            direction.cancel()
        writer.close()
        with contextlib.suppress(GuestError, ConnectionError):
            await stream.close()


class GuestLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
        self._reader = reader
        self._writer = writer
        self.name = name
        self._frames = FrameReader()
        self._streams: dict[int, GuestStream] = {}
        self._opening: dict[int, asyncio.Future[None]] = {}
        self._next_stream = 1
        self._waiters: dict[FrameType, list[asyncio.Future[Frame]]] = {}
        self._unsent = 0
        self._task: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()
        self._kernel_exited = asyncio.Event()
        self.kernel_exit: int | None = None
        self.ready_info: dict[str, Any] | None = None
        self.guest_errors: list[str] = []
        # host:port pairs the guest may reach (CONNECT frames); empty means no egress at all.
        self.egress: frozenset[tuple[str, int]] = frozenset()
        self._egress_tasks: set[asyncio.Task[None]] = set()

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.ensure_future(self._read_loop())

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def close(self) -> None:
        for task in list(self._egress_tasks):
            task.cancel()
        if self._task is not None:
            self._task.cancel()
        self._writer.close()
        self._mark_closed()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    async def wait_kernel_exit(self) -> int | None:
        """Returns when the kernel process exits or the channel closes."""
        done = asyncio.ensure_future(self._kernel_exited.wait())
        gone = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait([done, gone], return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            gone.cancel()
        return self.kernel_exit

    # --- requests ---------------------------------------------------------------------------
    async def wait_ready(self) -> dict[str, Any]:
        """Wait for the agent's "warm kernel ready" (template builds)."""
        if self.ready_info is None:
            frame = await self._expect(FrameType.READY, None)
            self.ready_info = frame.json()
        return self.ready_info

    async def resume(self, params: ResumeParams) -> ResumeConfirmation:
        sent_at = time.time()
        self.egress = frozenset(params.egress)
        request = {
            "nonce": params.nonce.hex(),
            "key": params.key.hex(),
            "session": params.session,
            "entropy": params.entropy.hex(),
            "time": params.wall_clock(),
            "egress": sorted([host, port] for host, port in params.egress),
            "cpu_time_limit_s": params.cpu_time_limit_s,
        }
        frame = await self._expect(FrameType.RESUMED, encode_json(FrameType.RESUME, request))
        round_trip = time.time() - sent_at
        answer = frame.json()
        if answer.get("nonce") != params.nonce.hex():
            raise GuestError(f"{self.name}: resume confirmation for another request")
        if answer.get("proof") != resume_proof(params.key, params.nonce):
            raise GuestError(f"{self.name}: guest did not install the new key")
        if not answer.get("entropy_reseeded"):
            raise GuestError(f"{self.name}: guest did not reseed its kernel CRNG")
        if not answer.get("generators_reseeded"):
            raise GuestError(f"{self.name}: guest did not reseed its Python generators")
        guest_time = float(answer.get("time", 0.0))
        return ResumeConfirmation(
            key_id=hashlib.sha256(params.key).hexdigest()[:16],
            urandom_digest=str(answer.get("urandom_digest", "")),
            clock_offset_s=guest_time - (sent_at + round_trip / 2),
            round_trip_s=round_trip,
            details=answer,
        )

    async def ping(self) -> float:
        started = time.monotonic()
        await self._expect(FrameType.PONG, encode_json(FrameType.PING, {"token": started}))
        return time.monotonic() - started

    async def quiesce(self) -> None:
        """Ask the agent to drop every stream: the quiescent point a snapshot needs."""
        await self._expect(FrameType.QUIESCED, encode_json(FrameType.QUIESCE, {}))
        for stream in list(self._streams.values()):
            stream._closed_by_guest()
        self._streams.clear()

    async def signal(self, signum: int) -> None:
        await self._send(encode_json(FrameType.SIGNAL, {"signum": int(signum)}))

    async def open_stream(self, port: int, timeout: float = 10.0) -> GuestStream:
        stream_id = self._next_stream
        self._next_stream += 1
        stream = GuestStream(self, stream_id)
        self._streams[stream_id] = stream
        opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._opening[stream_id] = opened
        try:
            await self._send(encode_json(FrameType.OPEN, {"port": port}, stream_id))
            await asyncio.wait_for(asyncio.shield(opened), timeout)
        except BaseException:
            self._streams.pop(stream_id, None)
            raise
        finally:
            self._opening.pop(stream_id, None)
        return stream

    async def send_raw(self, data: bytes) -> None:
        """Write bytes to the channel as they are, framed or not (protocol robustness tests)."""
        await self._send(data)
        await self._writer.drain()

    # --- plumbing ---------------------------------------------------------------------------
    async def _send(self, frame: bytes) -> None:
        if self.closed:
            raise GuestError(f"{self.name}: agent channel is closed")
        self._writer.write(frame)
        self._unsent += len(frame)
        if self._unsent >= DRAIN_THRESHOLD:
            self._unsent = 0
            await self._writer.drain()

    async def _send_data(self, stream_id: int, data: bytes) -> None:
        for frame in encode_data(stream_id, data):
            await self._send(frame)

    async def _expect(self, ftype: FrameType, request: bytes | None) -> Frame:
        waiter: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(ftype, []).append(waiter)
        try:
            if request is not None:
                await self._send(request)
            return await waiter
        finally:
            pending = self._waiters.get(ftype, [])
            if waiter in pending:
                pending.remove(waiter)

    async def _read_loop(self) -> None:
        try:
            while True:
                chunk = await self._reader.read(READ_CHUNK)
                if not chunk:
                    break
                self._frames.feed(chunk)
                for item in self._frames.frames():
                    if isinstance(item, ProtocolError):
                        log.warning("%s: garbage from guest: %s", self.name, item)
                    else:
                        await self._dispatch(item)
        except (ConnectionError, OSError) as exc:
            log.info("%s: agent channel failed: %s", self.name, exc)
        finally:
            self._mark_closed()

    async def _dispatch(self, frame: Frame) -> None:
        try:
            if frame.type is FrameType.DATA:
                stream = self._streams.get(frame.stream)
                if stream is not None:
                    await stream._deliver(frame.payload)
            elif frame.type is FrameType.OPENED:
                self._resolve_open(frame.stream, None)
            elif frame.type is FrameType.CLOSE:
                self._resolve_open(frame.stream, GuestError(f"guest refused stream {frame.stream}"))
                stream = self._streams.pop(frame.stream, None)
                if stream is not None:
                    stream._closed_by_guest()
            elif frame.type is FrameType.CONNECT:
                self._connect_egress(frame)
            elif frame.type is FrameType.KERNEL_EXIT:
                self.kernel_exit = int(frame.json().get("status", -1))
                self._kernel_exited.set()
            elif frame.type is FrameType.ERROR:
                message = str(frame.json().get("message", ""))
                self.guest_errors.append(message)
                log.warning("%s: agent reported: %s", self.name, message)
                if frame.stream:
                    self._resolve_open(frame.stream, GuestError(message))
                elif message.startswith(f"{FrameType.RESUME.name}:"):
                    # The agent refused the RESUME (it answers "RESUME: <error>"): no RESUMED
                    # will follow, so fail the wait now instead of at the resume timeout.
                    self._fail(FrameType.RESUMED, GuestError(f"{self.name}: guest refused the resume: {message}"))
            elif frame.type is FrameType.READY:
                self.ready_info = frame.json()
                self._wake(frame)
            else:
                self._wake(frame)
        except ProtocolError as exc:
            log.warning("%s: bad %s frame from guest: %s", self.name, frame.type.name, exc)

    def _connect_egress(self, frame: Frame) -> None:
        """A guest program connects out: allowed only to the listed host:port pairs."""
        request = frame.json()
        target = (str(request.get("host")), request.get("port"))
        refusal = None
        if frame.stream < GUEST_STREAM_BASE or frame.stream in self._streams:
            refusal = f"stream id {frame.stream} is not a free guest stream id"
        elif target not in self.egress:
            refusal = f"egress to {target[0]}:{target[1]} is not allowed"
        if refusal is not None:
            log.warning("%s: refused CONNECT: %s", self.name, refusal)
            self._writer.write(encode_json(FrameType.CLOSE, {"reason": refusal}, frame.stream))
            return
        stream = GuestStream(self, frame.stream)
        self._streams[frame.stream] = stream
        task = asyncio.ensure_future(self._egress(stream, target[0], int(target[1])))
        self._egress_tasks.add(task)
        task.add_done_callback(self._egress_tasks.discard)

    async def _egress(self, stream: GuestStream, host: str, port: int) -> None:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=READ_CHUNK), 10)
        except (OSError, asyncio.TimeoutError) as exc:
            self._streams.pop(stream.id, None)
            stream._closed_by_guest()
            with contextlib.suppress(GuestError):
                await self._send(encode_json(FrameType.CLOSE, {"reason": f"connect {host}:{port}: {exc}"}, stream.id))
            return
        with contextlib.suppress(GuestError):
            await self._send(encode(FrameType.OPENED, b"", stream.id))
        await splice(reader, writer, stream)

    def _fail(self, ftype: FrameType, error: Exception) -> None:
        for waiter in self._waiters.pop(ftype, []):
            if not waiter.done():
                waiter.set_exception(error)

    def _wake(self, frame: Frame) -> None:
        for waiter in self._waiters.pop(frame.type, []):
            if not waiter.done():
                waiter.set_result(frame)

    def _resolve_open(self, stream_id: int, error: Exception | None) -> None:
        opened = self._opening.get(stream_id)
        if opened is not None and not opened.done():
            if error is None:
                opened.set_result(None)
            else:
                opened.set_exception(error)

    def _mark_closed(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        error = GuestError(f"{self.name}: agent channel closed")
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(error)
        self._waiters.clear()
        for stream_id in list(self._opening):
            self._resolve_open(stream_id, error)
        for stream in self._streams.values():
            stream._closed_by_guest()
        self._streams.clear()
