"""Deterministic "newc" cpio archives, the format the kernel unpacks as an initramfs.

Written here rather than with cpio(1) so that the archive depends only on the staged tree's
contents: sorted entries, fixed inode numbers, mtimes and owners, normalised permissions, and
device nodes (/dev/console) that an unprivileged build could not create on disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

_MTIME = 0
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DeviceNode:
    path: str  # inside the archive, without a leading slash
    major: int
    minor: int
    mode: int = stat.S_IFCHR | 0o600


def write_archive(
    tree: Path, out: BinaryIO, devices: list[DeviceNode], progress: Callable[[float], None]
) -> None:
    paths = sorted([p.relative_to(tree).as_posix() for p in tree.rglob("*")] + [d.path for d in devices])
    nodes = {d.path: d for d in devices}
    total = len(paths)
    for ino, name in enumerate(paths, start=1):
        if name in nodes:
            node = nodes[name]
            _write_entry(out, ino, name, node.mode, nlink=1, rdev=(node.major, node.minor), data=b"")
        else:
            _write_path(out, ino, name, tree / name)
        if ino % 500 == 0:
            progress(ino / total)
    _write_entry(out, 0, "TRAILER!!!", 0, nlink=1, rdev=(0, 0), data=b"")
    progress(1.0)


def _write_path(out: BinaryIO, ino: int, name: str, path: Path) -> None:
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode):
        _write_entry(out, ino, name, stat.S_IFLNK | 0o777, 1, (0, 0), os.readlink(path).encode())
    elif stat.S_ISDIR(info.st_mode):
        _write_entry(out, ino, name, stat.S_IFDIR | _permissions(info.st_mode), 2, (0, 0), b"")
    elif stat.S_ISREG(info.st_mode):
        mode = stat.S_IFREG | _permissions(info.st_mode)
        _write_header(out, ino, name, mode, 1, (0, 0), info.st_size)
        with path.open("rb") as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
        out.write(_padding(info.st_size))
    else:
        raise ValueError(f"cannot archive {path}: not a file, directory or symlink")


def _permissions(mode: int) -> int:
    """0755 or 0644 (sticky kept), so the host's umask does not leak into the image."""
    base = 0o755 if mode & 0o111 else 0o644
    return base | (mode & stat.S_ISVTX)


def _write_entry(
    out: BinaryIO, ino: int, name: str, mode: int, nlink: int, rdev: tuple[int, int], data: bytes
) -> None:
    _write_header(out, ino, name, mode, nlink, rdev, len(data))
    out.write(data)
    out.write(_padding(len(data)))


def _write_header(
    out: BinaryIO, ino: int, name: str, mode: int, nlink: int, rdev: tuple[int, int], size: int
) -> None:
    encoded = name.encode() + b"\0"
    fields = (ino, mode, 0, 0, nlink, _MTIME, size, 0, 0, rdev[0], rdev[1], len(encoded), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    out.write(header)
    out.write(encoded)
    out.write(_padding(len(header) + len(encoded)))


def _padding(length: int) -> bytes:
    return b"\0" * (-length % 4)
