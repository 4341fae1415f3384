"""The agent's byte stream to the host, whatever carries it.

QEMU gives the agent a virtio-serial port (no vhost-vsock on these hosts); vmcore gives it a
virtio-vsock listening port. Either way the agent sees a sequence of host connections, each an
asyncio (reader, writer) pair; the rest of the agent never knows which transport it has.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from pathlib import Path

from forkvm_agent.agent_protocol import AGENT_SERIAL_PORT_NAME, AGENT_VSOCK_PORT

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# While no host is attached, a virtio-serial port reads EOF at once; poll at this pace.
SERIAL_IDLE_POLL_S = 0.05


def find_serial_port(name: str = AGENT_SERIAL_PORT_NAME) -> Path | None:
    for entry in Path("/sys/class/virtio-ports").glob("*"):
        try:
            if (entry / "name").read_text().strip() == name:
                return Path("/dev") / entry.name
        except OSError:
            continue
    return None


class SerialPortTransport:
    def __init__(self, device: Path) -> None:
        self.device = device
        self.description = f"virtio-serial {device}"

    async def accept(self) -> Connection:
        loop = asyncio.get_running_loop()
        while True:
            fd = os.open(self.device, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            if self._host_attached(fd):
                break
            os.close(fd)
            await asyncio.sleep(SERIAL_IDLE_POLL_S)
        reader = asyncio.StreamReader(limit=1 << 22)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
        write_fd = os.dup(fd)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb", 0)
        )
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    @staticmethod
    def _host_attached(fd: int) -> bool:
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP)
        return not any(event & select.POLLHUP for _, event in poller.poll(0))


class VsockTransport:
    def __init__(self, port: int = AGENT_VSOCK_PORT) -> None:
        self.description = f"vsock port {port}"
        self._server = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        self._server.bind((socket.VMADDR_CID_ANY, port))
        self._server.listen(4)
        self._server.setblocking(False)

    async def accept(self) -> Connection:
        conn, _ = await asyncio.get_running_loop().sock_accept(self._server)
        return await asyncio.open_connection(sock=conn, limit=1 << 22)


Transport = SerialPortTransport | VsockTransport


async def open_transport(wait_s: float = 30.0) -> Transport:
    """The virtio-serial port if the VM has one, else vsock."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        device = find_serial_port()
        if device is not None and device.exists():
            return SerialPortTransport(device)
        if os.path.exists("/dev/vsock"):
            return VsockTransport()
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError("no host channel: neither the agent's virtio-serial port nor /dev/vsock")
        await asyncio.sleep(0.05)
