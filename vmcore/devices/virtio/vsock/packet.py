"""vsock packets: the 44-byte header and its payload, parsed out of (or written into) descriptor
chains with every length checked against the chain first."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmcore.devices.virtio.queue import DescriptorChain, read_chain, write_chain
from vmcore.kvm.memory import GuestMemory

HEADER = struct.Struct("<QQIIIHHIII")
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUTDOWN_RCV, SHUTDOWN_SEND = 1, 2
MAX_PAYLOAD = 64 * 1024
HOST_CID = 2


class PacketError(Exception):
    """A malformed packet; it is dropped, the device goes on."""


@dataclass
class Packet:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    op: int
    flags: int = 0
    buf_alloc: int = 0
    fwd_cnt: int = 0
    data: bytes = b""
    type: int = TYPE_STREAM

    def header(self) -> bytes:
        return HEADER.pack(
            self.src_cid, self.dst_cid, self.src_port, self.dst_port, len(self.data),
            self.type, self.op, self.flags, self.buf_alloc, self.fwd_cnt,
        )


def parse_tx(memory: GuestMemory, chain: DescriptorChain) -> Packet:
    """A packet the guest sent: header then payload in the chain's readable descriptors."""
    available = chain.readable_length()
    if available < HEADER.size:
        raise PacketError(f"TX chain of {available} bytes is shorter than a header")
    (src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc,
     fwd_cnt) = HEADER.unpack(read_chain(memory, chain.readable, 0, HEADER.size))
    if length > MAX_PAYLOAD:
        raise PacketError(f"TX payload length {length} exceeds {MAX_PAYLOAD}")
    if HEADER.size + length > available:
        raise PacketError(f"TX payload length {length} exceeds the chain's {available} bytes")
    if ptype != TYPE_STREAM:
        raise PacketError(f"socket type {ptype} not supported")
    data = read_chain(memory, chain.readable, HEADER.size, length) if length else b""
    return Packet(src_cid, dst_cid, src_port, dst_port, op, flags, buf_alloc, fwd_cnt, data)


def rx_capacity(chain: DescriptorChain) -> int:
    """Payload bytes a guest RX chain can take (negative if not even a header fits)."""
    return chain.writable_length() - HEADER.size


def write_rx(memory: GuestMemory, chain: DescriptorChain, packet: Packet) -> int:
    """Write `packet` into an RX chain; bytes written (the used length)."""
    if len(packet.data) > rx_capacity(chain):
        raise PacketError("RX chain too small for the packet")
    return write_chain(memory, chain.writable, packet.header() + packet.data)
