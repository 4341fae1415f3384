"""A tiny busybox initramfs (newc cpio) built by the tests themselves."""

from __future__ import annotations

import shutil
from pathlib import Path

INIT_SCRIPT = b"#!/bin/busybox sh\n/bin/busybox echo forkvm-init-ran\nwhile :; do /bin/busybox sleep 1; done\n"


def _entry(name: str, mode: int, data: bytes, ino: int) -> bytes:
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
    header = b"070701" + b"".join(f"{value:08X}".encode() for value in fields)
    out = header + name.encode() + b"\x00"
    out += b"\x00" * (-len(out) % 4)
    out += data + b"\x00" * (-len(data) % 4)
    return out


def build_busybox_initramfs(path: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    blob = bytearray()
    entries = [
        ("bin", 0o040755, b""),
        ("dev", 0o040755, b""),
        ("proc", 0o040755, b""),
        ("bin/busybox", 0o100755, busybox.read_bytes()),
        ("init", 0o100755, INIT_SCRIPT),
    ]
    for ino, (name, mode, data) in enumerate(entries, start=1):
        blob += _entry(name, mode, data, ino)
    blob += _entry("TRAILER!!!", 0, b"", 0)
    path.write_bytes(bytes(blob))
    return path


def busybox_available() -> bool:
    return shutil.which("busybox") is not None or Path("/bin/busybox").exists()
