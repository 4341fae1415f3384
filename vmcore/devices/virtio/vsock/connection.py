"""One host-initiated vsock stream: a host Unix socket client bridged to a guest port.

Flow control follows the vsock credit scheme: we send the guest no more than its advertised
buffer minus what it has not yet consumed, and we advertise `BUF_ALLOC` bytes of our own.
"""

from __future__ import annotations

import enum
import socket
from collections import deque

from vmcore.devices.virtio.vsock import packet as p

BUF_ALLOC = 256 * 1024


class State(enum.Enum):
    CONNECTING = 1
    ESTABLISHED = 2
    CLOSED = 3


class Connection:
    def __init__(self, sock: socket.socket, local_port: int, peer_port: int, guest_cid: int):
        self.sock = sock
        self.local_port = local_port
        self.peer_port = peer_port
        self.guest_cid = guest_cid
        self.state = State.CONNECTING
        self.control: deque[int] = deque([p.OP_REQUEST])
        self.to_host = bytearray()  # guest data not yet accepted by the host socket
        self.to_guest = bytearray()  # host data not yet sent to the guest
        self.host_eof = False
        self.tx_cnt = 0
        self.fwd_cnt = 0
        self.fwd_cnt_sent = 0
        self.peer_buf_alloc = 0
        self.peer_fwd_cnt = 0

    def peer_credit(self) -> int:
        return max(0, self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt))

    def wants_host_input(self) -> bool:
        """Read more from the host socket only what the guest could accept."""
        return (
            self.state is State.ESTABLISHED and not self.host_eof
            and len(self.to_guest) < self.peer_credit()
        )

    def on_guest_packet(self, packet: p.Packet) -> None:
        self.peer_buf_alloc = packet.buf_alloc
        self.peer_fwd_cnt = packet.fwd_cnt
        if packet.op == p.OP_RESPONSE and self.state is State.CONNECTING:
            self.state = State.ESTABLISHED
            try:  # a few bytes into a fresh socket's empty buffer: never partial
                self.sock.send(f"OK {self.local_port}\n".encode())
            except OSError:
                self.reset()
        elif packet.op == p.OP_RW and self.state is State.ESTABLISHED:
            if len(self.to_host) + len(packet.data) > BUF_ALLOC:
                self.reset()  # the guest ignored our credit
                return
            self.to_host += packet.data
        elif packet.op == p.OP_CREDIT_REQUEST:
            self.control.append(p.OP_CREDIT_UPDATE)
        elif packet.op in (p.OP_RST, p.OP_SHUTDOWN) or self.state is State.CONNECTING:
            # Shutdown from the guest ends the stream; we answer with RST as the spec asks.
            if packet.op != p.OP_RST:
                self.control.append(p.OP_RST)
            self.state = State.CLOSED

    def flush_to_host(self) -> None:
        """Write what the host socket accepts now; count it as forwarded (our credit)."""
        while self.to_host:
            try:
                sent = self.sock.send(self.to_host)
            except BlockingIOError:
                return
            except OSError:
                self.reset()
                return
            del self.to_host[:sent]
            self.fwd_cnt += sent
        if self.fwd_cnt - self.fwd_cnt_sent >= BUF_ALLOC // 2:
            self.control.append(p.OP_CREDIT_UPDATE)

    def read_host(self) -> None:
        want = self.peer_credit() - len(self.to_guest)
        if want <= 0:
            return
        try:
            data = self.sock.recv(min(want, p.MAX_PAYLOAD))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.host_eof = True
            self.control.append(p.OP_SHUTDOWN)
        self.to_guest += data

    def reset(self) -> None:
        if self.state is not State.CLOSED:
            self.control.append(p.OP_RST)
        self.state = State.CLOSED

    def next_packet(self, capacity: int) -> p.Packet | None:
        """The next packet for the guest whose payload fits `capacity`, or None."""
        op, data = None, b""
        if self.control and (self.state is not State.ESTABLISHED or not self.to_guest
                             or self.control[0] != p.OP_SHUTDOWN):
            op = self.control.popleft()
        elif self.to_guest and self.state is State.ESTABLISHED and capacity > 0:
            take = min(capacity, self.peer_credit(), p.MAX_PAYLOAD)
            if take <= 0:
                return None
            op, data = p.OP_RW, bytes(self.to_guest[:take])
            del self.to_guest[:take]
            self.tx_cnt += take
        if op is None:
            return None
        flags = p.SHUTDOWN_RCV | p.SHUTDOWN_SEND if op == p.OP_SHUTDOWN else 0
        self.fwd_cnt_sent = self.fwd_cnt
        return p.Packet(
            p.HOST_CID, self.guest_cid, self.local_port, self.peer_port, op, flags,
            BUF_ALLOC, self.fwd_cnt, data,
        )

    @property
    def finished(self) -> bool:
        return self.state is State.CLOSED and not self.control

    def close(self) -> None:
        self.sock.close()
