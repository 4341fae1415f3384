"""Where the daemon keeps its socket, log and templates."""

from __future__ import annotations

import os
from pathlib import Path


def runtime_dir() -> Path:
    """Per-user directory for the daemon's socket, pid file and log (mode 0700)."""
    configured = os.environ.get("FORKVM_RUNTIME_DIR")
    if configured:
        path = Path(configured)
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "forkvm"
    else:
        path = Path("/tmp") / f"forkvm-{os.getuid()}"
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user; set FORKVM_RUNTIME_DIR")
    path.chmod(0o700)
    return path


def daemon_socket() -> Path:
    return runtime_dir() / "daemon.sock"


def daemon_pid_file() -> Path:
    return runtime_dir() / "daemon.pid"


def daemon_log() -> Path:
    return runtime_dir() / "daemon.log"


def cache_dir() -> Path:
    configured = os.environ.get("FORKVM_CACHE_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "forkvm"


def template_root(backend: str) -> Path:
    return cache_dir() / "templates" / backend
