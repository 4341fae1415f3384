"""The host side of a VM's vsock: a Unix socket where host clients ask for guest ports.

A client connects to the VM's socket and writes "CONNECT <port>\\n". The muxer opens a stream to
that guest port; when the guest accepts, the client reads "OK <host port>\\n" and from then on
the socket is a byte stream to the guest. If the guest refuses, the client's socket is closed.
All of it runs in one thread per VM, woken by epoll.
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
from pathlib import Path

from vmcore.devices.virtio.vsock import packet as p
from vmcore.devices.virtio.vsock.connection import Connection

log = logging.getLogger(__name__)
MAX_CONNECT_LINE = 32
MAX_CONNECTIONS = 1024
FIRST_LOCAL_PORT = 1 << 30


class Muxer:
    def __init__(self, path: Path, guest_cid: int) -> None:
        self.path = path
        self.guest_cid = guest_cid
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        if path.exists():
            path.unlink()
        self.listener.bind(str(path))
        self.listener.listen(64)
        self.handshaking: dict[int, tuple[socket.socket, bytearray]] = {}
        self.connections: dict[int, Connection] = {}  # by socket fd
        self.by_ports: dict[tuple[int, int], Connection] = {}
        self._ports = itertools.count(FIRST_LOCAL_PORT)

    # --- host side events ----------------------------------------------------------------------
    def fds(self) -> dict[int, int]:
        """fd -> epoll mask wanted right now."""
        wanted = {self.listener.fileno(): select.EPOLLIN}
        for fd in self.handshaking:
            wanted[fd] = select.EPOLLIN
        for fd, conn in self.connections.items():
            mask = select.EPOLLIN if conn.wants_host_input() else 0
            if conn.to_host:
                mask |= select.EPOLLOUT
            wanted[fd] = mask
        return wanted

    def on_host_event(self, fd: int, events: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
        elif fd in self.handshaking:
            self._read_connect_line(fd)
        elif fd in self.connections:
            conn = self.connections[fd]
            conn.flush_to_host()
            if conn.wants_host_input():
                conn.read_host()
            elif events & (select.EPOLLHUP | select.EPOLLERR) and not events & select.EPOLLIN:
                conn.reset()  # the client went away while we could not read from it

    def _accept(self) -> None:
        try:
            client, _ = self.listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        self.handshaking[client.fileno()] = (client, bytearray())

    def _read_connect_line(self, fd: int) -> None:
        client, line = self.handshaking[fd]
        try:
            data = client.recv(MAX_CONNECT_LINE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        line += data
        if b"\n" not in line:
            if not data or len(line) >= MAX_CONNECT_LINE:
                del self.handshaking[fd]
                client.close()
            return
        del self.handshaking[fd]
        head, _, rest = bytes(line).partition(b"\n")
        words = head.split()
        if (len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit()
                or int(words[1]) >= 1 << 32 or len(self.connections) >= MAX_CONNECTIONS):
            client.close()
            return
        conn = Connection(client, next(self._ports), int(words[1]), self.guest_cid)
        conn.to_guest += rest  # bytes the client sent ahead of "OK" go to the guest
        self.connections[fd] = conn
        self.by_ports[(conn.local_port, conn.peer_port)] = conn

    # --- guest side ----------------------------------------------------------------------------
    def on_guest_packet(self, packet: p.Packet) -> p.Packet | None:
        """Route a packet from the guest; an immediate reply (RST) if it matches nothing."""
        if packet.dst_cid != p.HOST_CID or packet.src_cid != self.guest_cid:
            return None  # misaddressed: drop
        conn = self.by_ports.get((packet.dst_port, packet.src_port))
        if conn is None:
            if packet.op == p.OP_RST:
                return None
            # Guest-initiated connections to the host are not offered: refuse them.
            return p.Packet(p.HOST_CID, self.guest_cid, packet.dst_port, packet.src_port, p.OP_RST)
        conn.on_guest_packet(packet)
        conn.flush_to_host()
        return None

    def next_packet(self, capacity: int) -> p.Packet | None:
        for conn in list(self.connections.values()):
            packet = conn.next_packet(capacity)
            if conn.finished:
                self._drop(conn)
            if packet is not None:
                return packet
        return None

    def _drop(self, conn: Connection) -> None:
        self.connections.pop(conn.sock.fileno(), None)
        self.by_ports.pop((conn.local_port, conn.peer_port), None)
        conn.close()

    def reset_all(self) -> None:
        """The transport was reset: every stream is dead, host sockets are closed."""
        for conn in list(self.connections.values()):
            self._drop(conn)
        for client, _ in self.handshaking.values():
            client.close()
        self.handshaking.clear()

    def close(self) -> None:
        self.reset_all()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
