"""The snapshot format: a directory holding `memory` (raw guest RAM) and `state`.

`state` is a header followed by named sections, each written by the persist module that owns it
(vCPU state, VM state, each device), with that module's own version::

    magic "FKVMSNAP" | u32 format version | u64 body length | 32-byte SHA-256 of the body | body
    body := section*        section := u16 name length | name | u16 version | u32 length | data

The checksum covers every section; a reader refuses a file whose magic, format version or
checksum does not match, or that lacks a section it needs, rather than restoring a guess.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

MAGIC = b"FKVMSNAP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIQ32s")
_SECTION_HEAD = struct.Struct("<HHI")
MEMORY_FILE = "memory"
STATE_FILE = "state"


class SnapshotError(Exception):
    """A snapshot cannot be read or does not match what the reader expects."""


@dataclass(frozen=True)
class Section:
    version: int
    data: bytes


@dataclass
class SnapshotState:
    sections: dict[str, Section] = field(default_factory=dict)

    def put(self, name: str, version: int, data: bytes) -> None:
        self.sections[name] = Section(version, data)

    def get(self, name: str, version: int) -> bytes:
        section = self.sections.get(name)
        if section is None:
            raise SnapshotError(f"snapshot has no section {name!r}")
        if section.version != version:
            raise SnapshotError(
                f"section {name!r} is version {section.version}, this reader knows {version}"
            )
        return section.data

    def encode(self) -> bytes:
        body = bytearray()
        for name, section in self.sections.items():
            raw = name.encode()
            body += _SECTION_HEAD.pack(len(raw), section.version, len(section.data))
            body += raw + section.data
        digest = hashlib.sha256(body).digest()
        return _HEADER.pack(MAGIC, FORMAT_VERSION, len(body), digest) + bytes(body)

    @classmethod
    def decode(cls, blob: bytes) -> "SnapshotState":
        if len(blob) < _HEADER.size:
            raise SnapshotError("state file truncated")
        magic, version, length, digest = _HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise SnapshotError("not a vmcore snapshot")
        if version != FORMAT_VERSION:
            raise SnapshotError(f"snapshot format {version}, this reader knows {FORMAT_VERSION}")
        body = blob[_HEADER.size :]
        if len(body) != length or hashlib.sha256(body).digest() != digest:
            raise SnapshotError("snapshot state checksum mismatch")
        state = cls()
        offset = 0
        while offset < len(body):
            if offset + _SECTION_HEAD.size > len(body):
                raise SnapshotError("section header truncated")
            name_len, section_version, data_len = _SECTION_HEAD.unpack_from(body, offset)
            offset += _SECTION_HEAD.size
            end = offset + name_len + data_len
            if end > len(body):
                raise SnapshotError("section truncated")
            name = body[offset : offset + name_len].decode()
            state.sections[name] = Section(section_version, body[offset + name_len : end])
            offset = end
        return state

    def write(self, directory: Path) -> None:
        """Atomically replace `directory/state` (write, fsync, rename)."""
        tmp = directory / (STATE_FILE + ".tmp")
        with open(tmp, "wb") as out:
            out.write(self.encode())
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, directory / STATE_FILE)

    @classmethod
    def read(cls, directory: Path) -> "SnapshotState":
        try:
            blob = (directory / STATE_FILE).read_bytes()
        except OSError as exc:
            raise SnapshotError(f"cannot read {directory / STATE_FILE}: {exc}") from exc
        return cls.decode(blob)
