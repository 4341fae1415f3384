"""Client of the forkvm daemon's Unix-socket API; starts the daemon when none is running.

Wire format, one JSON object per line:
    request   {"id": 1, "method": "launch", "params": {...}}
    progress  {"id": 1, "progress": {"stage": "...", "fraction": 0.5}}   (zero or more)
    answer    {"id": 1, "result": ...}  or  {"id": 1, "error": "message for the user"}
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from kernelprovider import paths

DAEMON_START_TIMEOUT_S = 30.0
ProgressHandler = Callable[[str, float | None], None]


# Exit status of `forkvm daemon run` when another daemon holds the socket's lock: whoever started
# this one waits for that daemon's socket instead.
ALREADY_RUNNING_EXIT = 3


class DaemonError(Exception):
    """The daemon refused a request or could not be reached; the message is for the user."""


class DaemonClient:
    def __init__(self, socket_path: Path | None = None, autostart: bool = True) -> None:
        self.socket_path = socket_path or paths.daemon_socket()
        self.autostart = autostart
        self._ids = itertools.count(1)

    async def call(self, method: str, progress: ProgressHandler | None = None, **params: Any) -> Any:
        reader, writer = await self._connect()
        try:
            request_id = next(self._ids)
            writer.write(json.dumps({"id": request_id, "method": method, "params": params}).encode() + b"\n")
            await writer.drain()
            while True:
                line = await reader.readline()
                if not line:
                    raise DaemonError(f"the forkvm daemon closed the connection during {method!r}; see {paths.daemon_log()}")
                message = json.loads(line)
                if "progress" in message:
                    if progress is not None:
                        progress(message["progress"]["stage"], message["progress"].get("fraction"))
                    continue
                if "error" in message:
                    raise DaemonError(message["error"])
                return message.get("result")
        finally:
            writer.close()

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 24)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if not self.autostart:
                raise DaemonError(
                    f"the forkvm daemon is not running (no socket at {self.socket_path}); "
                    "start it with `forkvm daemon start`"
                ) from exc
        await asyncio.to_thread(start_daemon_process, self.socket_path)
        return await asyncio.open_unix_connection(str(self.socket_path), limit=1 << 24)


def daemon_running(socket_path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(socket_path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def start_daemon_process(socket_path: Path, timeout: float = DAEMON_START_TIMEOUT_S) -> int:
    """Start `forkvm daemon run` detached from this process; returns its pid once it serves."""
    if daemon_running(socket_path):
        return -1
    log_path = paths.daemon_log()
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "kernelprovider.cli", "daemon", "run"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon_running(socket_path):
            return process.pid if process.poll() is None else -1
        if process.poll() not in (None, ALREADY_RUNNING_EXIT):
            break
        time.sleep(0.05)
    tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
    raise DaemonError(f"the forkvm daemon did not start (see {log_path}):\n{tail}")


def call_sync(method: str, progress: ProgressHandler | None = None, autostart: bool = True, **params: Any) -> Any:
    return asyncio.run(DaemonClient(autostart=autostart).call(method, progress=progress, **params))
