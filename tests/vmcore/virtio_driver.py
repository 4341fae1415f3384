"""A virtio-mmio vsock driver played in Python: writes rings and descriptors into guest memory
by hand, the way the guest kernel would, so device tests need no guest."""

from __future__ import annotations

import struct
import time

from vmcore.devices.virtio import mmio
from vmcore.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from vmcore.devices.virtio.vsock import packet as p

QUEUE_SIZE = 16
RING_BASE = 0x10000  # queue q's rings live at RING_BASE + q * 0x1000
BUFFER_BASE = 0x40000  # descriptor buffers, 0x2000 apart
GUEST_CID = 3


class Ring:
    def __init__(self, memory, index: int) -> None:
        self.memory = memory
        self.desc = RING_BASE + index * 0x1000
        self.avail = self.desc + 16 * QUEUE_SIZE
        self.used = self.desc + 0x800
        self.next_desc = 0
        self.avail_idx = 0
        self.used_seen = 0

    def put_descriptor(self, index: int, address: int, length: int, flags: int, next_: int = 0):
        self.memory.write(self.desc + 16 * index, struct.pack("<QIHH", address, length, flags, next_))

    def publish(self, head: int) -> None:
        self.memory.write_u16(self.avail + 4 + 2 * (self.avail_idx % QUEUE_SIZE), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_u16(self.avail + 2, self.avail_idx)

    def take_used(self) -> list[tuple[int, int]]:
        out = []
        while self.used_seen != self.memory.read_u16(self.used + 2):
            slot = self.used + 4 + 8 * (self.used_seen % QUEUE_SIZE)
            out.append(struct.unpack("<II", self.memory.read(slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out


class VsockDriver:
    def __init__(self, transport: mmio.MmioTransport, memory) -> None:
        self.t = transport
        self.memory = memory
        self.rings = [Ring(memory, i) for i in range(3)]
        self.received: list[p.Packet] = []

    def reg(self, offset: int, value: int | None = None) -> int:
        if value is None:
            return struct.unpack("<I", self.t.read(offset, 4))[0]
        self.t.write(offset, struct.pack("<I", value))
        return value

    def initialise(self) -> None:
        assert self.reg(0x00) == mmio.MAGIC and self.reg(0x08) == 19
        self.reg(0x70, 0)
        self.memory.write(RING_BASE, bytes(0x3000))  # fresh rings, as a driver allocates them
        self.reg(0x70, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
        self.reg(0x24, 1)
        self.reg(0x20, 1)  # VIRTIO_F_VERSION_1
        self.reg(0x70, self.reg(0x70) | mmio.STATUS_FEATURES_OK)
        assert self.reg(0x70) & mmio.STATUS_FEATURES_OK
        for index, ring in enumerate(self.rings):
            self.setup_queue(index, ring.desc, ring.avail, ring.used, QUEUE_SIZE)
        self.reg(0x70, self.reg(0x70) | mmio.STATUS_DRIVER_OK)
        self.post_rx_buffers(QUEUE_SIZE)

    def setup_queue(self, index: int, desc: int, avail: int, used: int, size: int) -> None:
        self.reg(0x30, index)
        self.reg(0x38, size)
        for offset, address in ((0x80, desc), (0x90, avail), (0xA0, used)):
            self.reg(offset, address & 0xFFFFFFFF)
            self.reg(offset + 4, address >> 32)
        self.reg(0x44, 1)

    def post_rx_buffers(self, count: int) -> None:
        ring = self.rings[0]
        for _ in range(count):
            index = ring.next_desc % QUEUE_SIZE
            ring.next_desc += 1
            ring.put_descriptor(index, BUFFER_BASE + 0x2000 * index, 4096 + p.HEADER.size, DESC_F_WRITE)
            ring.publish(index)
        self.notify(0)

    def notify(self, queue: int) -> None:
        self.reg(mmio.NOTIFY_OFFSET, queue)

    def send(self, packet: p.Packet) -> None:
        """Header and payload in two chained descriptors, as Linux's driver does."""
        ring = self.rings[1]
        head = ring.next_desc % QUEUE_SIZE
        second = (head + 1) % QUEUE_SIZE
        ring.next_desc += 2
        base = BUFFER_BASE + 0x80000 + 0x2000 * head
        self.memory.write(base, packet.header())
        self.memory.write(base + 0x100, packet.data)
        ring.put_descriptor(head, base, p.HEADER.size, DESC_F_NEXT if packet.data else 0, second)
        ring.put_descriptor(second, base + 0x100, len(packet.data), 0)
        ring.publish(head)
        self.notify(1)

    def poll(self, timeout: float = 2.0) -> list[p.Packet]:
        """Packets the device put in RX buffers (recycling the buffers)."""
        deadline = time.monotonic() + timeout
        ring = self.rings[0]
        got: list[p.Packet] = []
        while not got and time.monotonic() < deadline:
            for head, length in ring.take_used():
                raw = self.memory.read(BUFFER_BASE + 0x2000 * head, length)
                fields = p.HEADER.unpack_from(raw)
                got.append(p.Packet(fields[0], fields[1], fields[2], fields[3], fields[6],
                                    fields[7], fields[8], fields[9], raw[p.HEADER.size:]))
                ring.put_descriptor(head, BUFFER_BASE + 0x2000 * head, 4096 + p.HEADER.size, DESC_F_WRITE)
                ring.publish(head)
            if got:
                self.notify(0)
            else:
                time.sleep(0.002)
        self.received += got
        return got

    def tx_used(self) -> list[tuple[int, int]]:
        return self.rings[1].take_used()

    def packet(self, op: int, src_port: int, dst_port: int, data: bytes = b"",
               buf_alloc: int = 65536, fwd_cnt: int = 0) -> p.Packet:
        return p.Packet(GUEST_CID, p.HOST_CID, src_port, dst_port, op, 0, buf_alloc, fwd_cnt, data)
