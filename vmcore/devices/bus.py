"""Address-range dispatch of port I/O and MMIO exits to devices."""

from __future__ import annotations

import bisect
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, size: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


class BusError(Exception):
    """Overlapping ranges at registration: a host programming error, not a guest one."""


class Bus:
    """Sorted, non-overlapping [base, base+length) ranges. Unclaimed reads return all ones."""

    def __init__(self) -> None:
        self._bases: list[int] = []
        self._entries: list[tuple[int, int, BusDevice]] = []

    def register(self, base: int, length: int, device: BusDevice) -> None:
        index = bisect.bisect_left(self._bases, base)
        if index > 0:
            prev_base, prev_len, _ = self._entries[index - 1]
            if prev_base + prev_len > base:
                raise BusError(f"range at {base:#x} overlaps one at {prev_base:#x}")
        if index < len(self._bases) and base + length > self._bases[index]:
            raise BusError(f"range at {base:#x} overlaps one at {self._bases[index]:#x}")
        self._bases.insert(index, base)
        self._entries.insert(index, (base, length, device))

    def find(self, address: int, size: int) -> tuple[BusDevice, int] | None:
        index = bisect.bisect_right(self._bases, address) - 1
        if index < 0:
            return None
        base, length, device = self._entries[index]
        if address + size > base + length:
            return None
        return device, address - base

    def read(self, address: int, size: int) -> bytes:
        found = self.find(address, size)
        if found is None:
            return b"\xff" * size
        device, offset = found
        return device.read(offset, size)

    def write(self, address: int, data: bytes) -> bool:
        """False when nothing claims the address (the write is dropped)."""
        found = self.find(address, len(data))
        if found is None:
            return False
        device, offset = found
        device.write(offset, data)
        return True
