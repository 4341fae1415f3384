"""Split virtqueues. Every guest-controlled value of a queue is checked here and nowhere else:
ring addresses, ring size, the available index, descriptor indices, addresses, lengths, flags and
chain length. What leaves this module (a DescriptorChain) is safe to use.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vmcore.kvm.memory import GuestMemory, GuestMemoryError

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
_DESC = struct.Struct("<QIHH")
MAX_CHAIN_BYTES = 1 << 24  # no single request of ours needs more; bounds host work per chain


class QueueError(Exception):
    """The guest put something invalid in a queue; the device must stop using it."""


@dataclass(frozen=True)
class Descriptor:
    address: int
    length: int
    writable: bool


@dataclass(frozen=True)
class DescriptorChain:
    head: int
    readable: tuple[Descriptor, ...]
    writable: tuple[Descriptor, ...]

    def readable_length(self) -> int:
        return sum(d.length for d in self.readable)

    def writable_length(self) -> int:
        return sum(d.length for d in self.writable)


class Queue:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_table = 0
        self.avail_ring = 0
        self.used_ring = 0
        self.next_avail = 0
        self.next_used = 0

    def validate(self, memory: GuestMemory) -> None:
        """Check the driver's configuration when it marks the queue ready."""
        size = self.size
        if size == 0 or size > self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} invalid (max {self.max_size}, power of two)")
        for name, address, align, length in (
            ("descriptor table", self.desc_table, 16, 16 * size),
            ("available ring", self.avail_ring, 2, 6 + 2 * size),
            ("used ring", self.used_ring, 4, 6 + 8 * size),
        ):
            if address % align:
                raise QueueError(f"{name} at {address:#x} is not {align}-byte aligned")
            try:
                memory.check(address, length)
            except GuestMemoryError as exc:
                raise QueueError(f"{name}: {exc}") from None

    def pending(self, memory: GuestMemory) -> int:
        """How many chains the driver has made available that we have not taken."""
        avail_idx = memory.read_u16(self.avail_ring + 2)
        count = (avail_idx - self.next_avail) & 0xFFFF
        if count > self.size:
            raise QueueError(f"available index moved {count} entries on a queue of {self.size}")
        return count

    def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, fully validated, or None if there is none."""
        if not self.ready or self.pending(memory) == 0:
            return None
        slot = self.avail_ring + 4 + 2 * (self.next_avail % self.size)
        head = memory.read_u16(slot)
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        return self._parse(memory, head)

    def undo_pop(self) -> None:
        """Give back the last popped chain (e.g. it was too small for what we had to send)."""
        self.next_avail = (self.next_avail - 1) & 0xFFFF

    def _parse(self, memory: GuestMemory, head: int) -> DescriptorChain:
        readable: list[Descriptor] = []
        writable: list[Descriptor] = []
        index = head
        total = 0
        for _ in range(self.size):
            if index >= self.size:
                raise QueueError(f"descriptor index {index} outside a queue of {self.size}")
            address, length, flags, next_index = _DESC.unpack(
                memory.read(self.desc_table + 16 * index, 16)
            )
            if flags & DESC_F_INDIRECT:
                raise QueueError("indirect descriptor, a feature this device does not offer")
            try:
                memory.check(address, length)
            except GuestMemoryError as exc:
                raise QueueError(f"descriptor {index}: {exc}") from None
            total += length
            if total > MAX_CHAIN_BYTES:
                raise QueueError(f"descriptor chain longer than {MAX_CHAIN_BYTES} bytes")
            descriptor = Descriptor(address, length, bool(flags & DESC_F_WRITE))
            if descriptor.writable:
                writable.append(descriptor)
            elif writable:
                raise QueueError("readable descriptor after a writable one")
            else:
                readable.append(descriptor)
            if not flags & DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable))
            index = next_index
        raise QueueError(f"descriptor chain from {head} is longer than the queue (a loop)")

    def add_used(self, memory: GuestMemory, head: int, length: int) -> None:
        slot = self.used_ring + 4 + 8 * (self.next_used % self.size)
        memory.write(slot, struct.pack("<II", head, length))
        self.next_used = (self.next_used + 1) & 0xFFFF
        memory.write_u16(self.used_ring + 2, self.next_used)


def read_chain(memory: GuestMemory, descriptors: tuple[Descriptor, ...], skip: int, length: int) -> bytes:
    """`length` bytes starting `skip` bytes into the concatenated descriptors."""
    out = bytearray()
    for d in descriptors:
        if skip >= d.length:
            skip -= d.length
            continue
        take = min(d.length - skip, length - len(out))
        out += memory.read(d.address + skip, take)
        skip = 0
        if len(out) == length:
            break
    return bytes(out)


def write_chain(memory: GuestMemory, descriptors: tuple[Descriptor, ...], data: bytes) -> int:
    """Scatter `data` over the descriptors; the number of bytes written."""
    view = memoryview(data)
    done = 0
    for d in descriptors:
        if done == len(view):
            break
        take = min(d.length, len(view) - done)
        memory.write(d.address, view[done : done + take])
        done += take
    return done
