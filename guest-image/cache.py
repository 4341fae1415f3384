"""Content-addressed artifact cache: `<root>/<kind>/<sha256 of inputs>/`.

An entry directory only ever appears complete: builders write into a temporary sibling that
is renamed into place, so a crashed or concurrent build never leaves a half-written entry
that a later lookup would trust.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

_COMPLETE_MARKER = ".complete"


def cache_root() -> Path:
    configured = os.environ.get("FORKVM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "forkvm"


def digest(parts: Iterable[str | bytes]) -> str:
    """sha256 over a sequence of parts, length-prefixed so that ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def file_digests(paths: Iterable[Path], relative_to: Path) -> list[str]:
    """One "name:sha256" item per file, so renaming a file changes the key too."""
    items = []
    for path in sorted(paths):
        items.append(f"{path.relative_to(relative_to)}:{hashlib.sha256(path.read_bytes()).hexdigest()}")
    return items


def tree_files(root: Path) -> list[Path]:
    """Files under root, ignoring bytecode caches (they change on every import, not on edit)."""
    if not root.is_dir():
        return []
    return sorted(
        p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def dpkg_version(package: str) -> str:
    """The installed Debian version of package, or "" off Debian (then other inputs must do)."""
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return ""
    return out.stdout.strip()


def entry_dir(kind: str, key: str) -> Path:
    return cache_root() / kind / key


def lookup(kind: str, key: str) -> Path | None:
    entry = entry_dir(kind, key)
    return entry if (entry / _COMPLETE_MARKER).exists() else None


def build_entry(kind: str, key: str, build: Callable[[Path], None]) -> Path:
    """Run build(tmpdir) and publish tmpdir as the entry for (kind, key); returns the entry.

    Builds of one key are serialised by a lock file: a second process (another daemon, a test
    run) waits for the first and then finds the entry, instead of compiling a kernel again.
    """
    final = entry_dir(kind, key)
    final.parent.mkdir(parents=True, exist_ok=True)
    with (final.parent / f".{key}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return lookup(kind, key) or _build_unlocked(final, build)


def _build_unlocked(final: Path, build: Callable[[Path], None]) -> Path:
    key = final.name
    # Holding the lock, any staging directory of this key was left by a build that died.
    for stale in final.parent.glob(f".{key[:12]}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{key[:12]}-", dir=final.parent))
    try:
        build(staging)
        (staging / _COMPLETE_MARKER).touch()
        staging.rename(final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final
