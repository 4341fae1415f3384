"""A forked kernel as the daemon holds it: its VM, its host ports and its identity."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from jupyter_client.connect import write_connection_file

from vmcore.engine import Machine, ResumeParams

from kernelprovider.zmq_bridge import KernelPortBridge

log = logging.getLogger(__name__)


@dataclass
class ForkedKernel:
    id: str
    machine: Machine
    params: ResumeParams
    bridge: KernelPortBridge
    ports: dict[str, int]
    parent: str | None = None  # kernel id this one was branched from
    started: float = field(default_factory=time.time)
    launch_s: float = 0.0
    status: int | None = None
    end_reason: str = ""
    # A connection file the daemon wrote for this kernel (a `forkvm branch`); it goes with the kernel.
    connection_file: Path | None = None
    forget_timer: asyncio.TimerHandle | None = None  # the daemon's, for an ended kernel nobody released
    _watcher: asyncio.Task[None] | None = None

    def connection_info(self) -> dict[str, Any]:
        return {
            "ip": "127.0.0.1",
            "transport": "tcp",
            "signature_scheme": "hmac-sha256",
            "key": self.params.key.decode(),
            "kernel_name": "forkvm",
            **self.ports,
        }

    def write_connection_file(self, directory: Path) -> Path:
        path = directory / f"kernel-{self.id}.json"
        info = self.connection_info()
        write_connection_file(str(path), **{**info, "key": info["key"].encode()})
        self.connection_file = path
        return path

    def remove_connection_file(self) -> None:
        if self.connection_file is not None:
            self.connection_file.unlink(missing_ok=True)
            self.connection_file = None

    def watch(self, wall_time_limit_s: float, on_end: Callable[[ForkedKernel], None]) -> None:
        """Notice the kernel's death (process exit in the guest, or VM gone), free the VM, then
        call `on_end` (not when the watch is stopped by a release)."""
        self._watcher = asyncio.ensure_future(self._watch(wall_time_limit_s, on_end))

    async def _watch(self, wall_time_limit_s: float, on_end: Callable[[ForkedKernel], None]) -> None:
        try:
            status = await asyncio.wait_for(self.machine.wait(), wall_time_limit_s or None)
        except asyncio.TimeoutError:
            log.warning("kernel %s reached its wall-time limit of %.0f s", self.id, wall_time_limit_s)
            self.end_reason = f"wall-time limit of {wall_time_limit_s:.0f} s reached"
            status = -9
        self.status = status
        self.end_reason = self.end_reason or self.machine.end_reason()
        log.info("kernel %s ended with status %s%s", self.id, status, f": {self.end_reason}" if self.end_reason else "")
        await self.release()
        on_end(self)

    def poll(self) -> int | None:
        if self.status is None:
            self.status = self.machine.kernel_exit_status()
        return self.status

    async def release(self) -> None:
        """Stop the VM and close the host ports (idempotent)."""
        await self.bridge.close()
        await self.machine.kill()
        if self.status is None:
            self.status = self.machine.kernel_exit_status() or -9

    async def stop_watching(self) -> None:
        if self._watcher is not None and self._watcher is not asyncio.current_task():
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {
            "kernel_id": self.id,
            "vm_id": self.machine.id,
            # The VM's host process (QEMU's pid), for tools outside the daemon; None if it has none.
            "pid": getattr(self.machine, "pid", None),
            "backend": self.machine.backend,
            "template": self.machine.template,
            "parent": self.parent,
            "age_s": round(time.time() - self.started, 1),
            "launch_s": round(self.launch_s, 4),
            "private_memory_bytes": self.machine.private_memory_bytes() if self.status is None else 0,
            "status": self.poll(),
            "end_reason": self.end_reason,
            "ports": self.ports,
            "session": self.params.session,
        }
