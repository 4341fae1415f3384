"""The guest agent's main loop: PID 1 of the guest, kernel supervisor and host bridge."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any

from forkvm_agent import guest_os
from forkvm_agent.egress import EgressListeners, parse_targets
from forkvm_agent.agent_protocol import (
    GUEST_KERNEL_PORTS,
    PROTOCOL_VERSION,
    Frame,
    FrameReader,
    FrameType,
    ProtocolError,
    encode_json,
)
from forkvm_agent.kernel_process import KernelProcess
from forkvm_agent.stream_mux import StreamMux
from forkvm_agent.transport import Transport, open_transport

log = logging.getLogger("forkvm_agent")
# How long an incomplete frame may wait for its next bytes before it is treated as garbage.
# The host writes every frame whole, so a healthy frame's bytes follow each other closely.
STALLED_FRAME_S = 3.0


def uptime_s() -> float:
    with open("/proc/uptime") as f:
        return float(f.read().split()[0])


class Agent:
    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.kernel = KernelProcess()
        self.ready: dict[str, Any] | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._mux = StreamMux(self._send)
        self._egress = EgressListeners(self._mux)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, self._reap_children)
        self.kernel.start()
        asyncio.ensure_future(self._prepare_kernel())
        asyncio.ensure_future(self._report_kernel_exit())
        while True:
            reader, writer = await self.transport.accept()
            await self._serve(reader, writer)

    async def _prepare_kernel(self) -> None:
        try:
            info = await self.kernel.warm_up()
        except Exception as exc:
            log.exception("kernel warm-up failed")
            await self._send(encode_json(FrameType.ERROR, {"message": f"kernel warm-up failed: {exc}"}))
            return
        self.ready = {
            "kernel_pid": self.kernel.pid,
            "ports": GUEST_KERNEL_PORTS,
            "boot_to_ready_s": uptime_s(),
            "implementation": info.get("implementation"),
            "language_version": info.get("language_info", {}).get("version"),
        }
        print(f"forkvm-agent: warm kernel ready after {self.ready['boot_to_ready_s']:.1f} s", flush=True)
        await self._send(encode_json(FrameType.READY, self.ready))

    async def _report_kernel_exit(self) -> None:
        await self.kernel.exited.wait()
        print(f"forkvm-agent: kernel exited with status {self.kernel.exit_status}", flush=True)
        await self._send(encode_json(FrameType.KERNEL_EXIT, {"status": self.kernel.exit_status}))

    def _reap_children(self) -> None:
        # As PID 1 the agent also inherits every orphan the user's code leaves behind.
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if self.kernel.process is not None and pid == self.kernel.process.pid:
                self.kernel.process.returncode = os.waitstatus_to_exitcode(status)
                self.kernel.reaped(status)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        frames = FrameReader()
        await self._send(encode_json(FrameType.HELLO, {"version": PROTOCOL_VERSION, "ready": self.ready is not None}))
        if self.ready is not None:
            await self._send(encode_json(FrameType.READY, self.ready))
        while True:
            try:
                if frames.partial():
                    chunk = await asyncio.wait_for(reader.read(1 << 18), STALLED_FRAME_S)
                else:
                    chunk = await reader.read(1 << 18)
            except asyncio.TimeoutError:
                # A frame whose declared length was never delivered (a corrupted length field
                # or a truncated frame) would hold back every later frame: resynchronise.
                await self._error(str(frames.drop_partial()))
                chunk = None
            except ConnectionError:
                chunk = b""
            if chunk is not None and not chunk:
                break
            if chunk:
                frames.feed(chunk)
            for item in frames.frames():
                if isinstance(item, ProtocolError):
                    await self._error(str(item))
                else:
                    await self._handle_safely(item)
        self._writer = None
        writer.close()
        await self._mux.close_all()

    async def _send(self, frame: bytes) -> None:
        writer = self._writer
        if writer is None:
            return
        try:
            writer.write(frame)
            await writer.drain()
        except ConnectionError:
            self._writer = None

    async def _error(self, message: str, stream: int = 0) -> None:
        await self._send(encode_json(FrameType.ERROR, {"message": message}, stream))

    async def _handle_safely(self, frame: Frame) -> None:
        try:
            await self._handle(frame)
        except Exception as exc:
            log.exception("handling %s", frame.type.name)
            await self._error(f"{frame.type.name}: {type(exc).__name__}: {exc}", frame.stream)

    async def _handle(self, frame: Frame) -> None:
        ftype = frame.type
        if ftype is FrameType.DATA:
            await self._mux.data(frame.stream, frame.payload)
        elif ftype is FrameType.OPEN:
            await self._mux.open(frame.stream, frame.json().get("port"))
        elif ftype is FrameType.CLOSE:
            await self._mux.close(frame.stream)
        elif ftype is FrameType.OPENED:
            self._mux.opened(frame.stream)
        elif ftype is FrameType.RESUME:
            await self._send(encode_json(FrameType.RESUMED, await self._resume(frame.json())))
        elif ftype is FrameType.SIGNAL:
            self.kernel.send_signal(int(frame.json()["signum"]))
        elif ftype is FrameType.PING:
            await self._send(encode_json(FrameType.PONG, {"token": frame.json().get("token")}))
        elif ftype is FrameType.QUIESCE:
            await self._mux.close_all()
            await self._send(encode_json(FrameType.QUIESCED, {}))
        else:
            await self._error(f"unexpected {ftype.name} frame from the host")

    async def _resume(self, request: dict[str, Any]) -> dict[str, Any]:
        """Make this fork unique before any user code can run: entropy, clock, key, generators."""
        if self.ready is None:
            raise RuntimeError("the kernel is not ready yet")
        entropy = bytes.fromhex(str(request["entropy"]))
        if len(entropy) < 32:
            raise ValueError("RESUME carries less than 32 bytes of entropy")
        egress = parse_targets(request.get("egress", []))
        cpu_limit = float(request.get("cpu_time_limit_s") or 0)
        # A branch inherits the source's open streams; they belong to the source's host.
        await self._mux.close_all()
        guest_os.reseed_kernel_crng(entropy)
        guest_os.set_wall_clock(float(request["time"]))
        kernel_answer = await self.kernel.resume(
            {"key": request["key"], "nonce": request["nonce"], "session": request["session"]}
        )
        await self._egress.apply(egress)
        if cpu_limit > 0:
            self.kernel.limit_cpu_time(cpu_limit)
        return {
            "nonce": request["nonce"],
            "entropy_reseeded": True,
            "urandom_digest": guest_os.urandom_digest(),
            "time": time.time(),
            **kernel_answer,
        }


def _die_at_once(signum: int, frame: object) -> None:
    """SIGINT (the only signal PID 1 receives by default) ends the agent, hence the VM.

    Without this, Python would unwind asyncio and print a traceback on the emulated serial
    console first, which delays the guest panic (and the host noticing the kernel's death) by
    seconds; as PID 1 nothing needs cleaning up.
    """
    os.write(2, f"forkvm-agent: killed by signal {signum}\n".encode())
    os._exit(128 + signum)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="forkvm-agent: %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, _die_at_once)

    async def start() -> None:
        transport = await open_transport()
        print(f"forkvm-agent: host channel is {transport.description}", flush=True)
        await Agent(transport).run()

    asyncio.run(start())
