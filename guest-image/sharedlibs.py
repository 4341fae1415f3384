"""Finds the host shared libraries that a set of ELF files load, using ldd."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
_RESOLVED = re.compile(r"^\s*(?:\S+\s+=>\s+)?(/\S+)\s+\(0x[0-9a-f]+\)\s*$")
_MISSING = re.compile(r"^\s*(\S+)\s+=>\s+not found")
_BATCH = 200


class MissingLibraryError(RuntimeError):
    pass


def is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def needed_libraries(binaries: list[Path], provided_by: Path) -> set[Path]:
    """Host paths of every library the binaries need, except those found under provided_by

    (wheels such as numpy bundle their own libraries and find them through their RPATH).
    """
    found: set[Path] = set()
    for start in range(0, len(binaries), _BATCH):
        batch = binaries[start : start + _BATCH]
        out = subprocess.run(["ldd", *map(str, batch)], capture_output=True, text=True).stdout
        missing = [m[1] for line in out.splitlines() if (m := _MISSING.match(line))]
        if missing:
            raise MissingLibraryError(f"ldd cannot resolve {sorted(set(missing))} for files in {batch}")
        for line in out.splitlines():
            if m := _RESOLVED.match(line):
                lib = Path(m[1])
                if not lib.resolve().is_relative_to(provided_by.resolve()):
                    found.add(lib)
    return found
