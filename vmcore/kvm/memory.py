"""Guest physical memory: one contiguous region at guest address 0, backed by a file or memfd.

Every access is bounds-checked here, so device code handed a guest-controlled address cannot read
or write outside the guest's RAM: it gets GuestMemoryError instead.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

PAGE = 4096
_U16, _U32, _U64 = struct.Struct("<H"), struct.Struct("<I"), struct.Struct("<Q")


class GuestMemoryError(ValueError):
    """A guest physical range outside RAM (or an overflowing length) was asked for."""


class GuestMemory:
    """RAM of one VM. `private` mappings share the backing file copy-on-write."""

    def __init__(self, fd: int, size: int, private: bool) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest memory size {size} is not a positive multiple of {PAGE}")
        self.size = size
        self.private = private
        flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
        self._map = mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        # The host address KVM maps into the guest; the temporary ctypes view is dropped at once
        # so the mmap can still be closed.
        self.host_address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        self._view = memoryview(self._map)

    @classmethod
    def anonymous(cls, size: int, name: str = "vmcore-ram") -> "GuestMemory":
        """Fresh zeroed RAM in a memfd (shared, so a snapshot can be written from it)."""
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            return cls(fd, size, private=False)
        finally:
            os.close(fd)

    @classmethod
    def copy_on_write(cls, path: Path, size: int) -> "GuestMemory":
        """RAM that starts as the file's contents; writes stay private to this mapping."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != size:
                raise GuestMemoryError(f"{path} is not {size} bytes")
            return cls(fd, size, private=True)
        finally:
            os.close(fd)

    def check(self, gpa: int, length: int) -> None:
        if gpa < 0 or length < 0 or gpa + length > self.size:
            raise GuestMemoryError(
                f"guest range [{gpa:#x}, +{length:#x}) outside RAM of {self.size:#x} bytes"
            )

    def read(self, gpa: int, length: int) -> bytes:
        self.check(gpa, length)
        return self._map[gpa : gpa + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        self.check(gpa, len(data))
        self._map[gpa : gpa + len(data)] = data

    def view(self, gpa: int, length: int) -> memoryview:
        """A zero-copy window; valid until close()."""
        self.check(gpa, length)
        return self._view[gpa : gpa + length]

    def read_u16(self, gpa: int) -> int:
        self.check(gpa, 2)
        return _U16.unpack_from(self._map, gpa)[0]

    def read_u32(self, gpa: int) -> int:
        self.check(gpa, 4)
        return _U32.unpack_from(self._map, gpa)[0]

    def read_u64(self, gpa: int) -> int:
        self.check(gpa, 8)
        return _U64.unpack_from(self._map, gpa)[0]

    def write_u16(self, gpa: int, value: int) -> None:
        self.check(gpa, 2)
        _U16.pack_into(self._map, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self.check(gpa, 4)
        _U32.pack_into(self._map, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self.check(gpa, 8)
        _U64.pack_into(self._map, gpa, value)

    def save(self, path: Path) -> None:
        """Write the whole of RAM to `path`, leaving all-zero pages as holes."""
        zero = bytes(PAGE * 256)
        with open(path, "wb") as out:
            out.truncate(self.size)
            for start in range(0, self.size, len(zero)):
                chunk = self._view[start : start + len(zero)]
                if chunk != zero[: len(chunk)]:
                    out.seek(start)
                    out.write(chunk)

    def private_bytes(self) -> int:
        """Bytes of this mapping that are no longer shared with the backing file."""
        if not self.private:
            return self.size
        start = f"{self.host_address:x}-"
        with open("/proc/self/smaps", "rb") as smaps:
            inside = False
            for line in smaps:
                if line[:1] in b"0123456789abcdef" and b"-" in line.split(b" ", 1)[0]:
                    inside = line.decode().startswith(start)
                elif inside and line.startswith(b"Private_Dirty:"):
                    return int(line.split()[1]) * 1024
        return 0

    def close(self) -> None:
        if self._map.closed:
            return
        self._view.release()
        self._map.close()
