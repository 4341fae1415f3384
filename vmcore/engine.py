"""The engine interface: what the daemon may ask of a VM backend.

Two backends implement it: vmcore's own KVM VMM (`vmcore.kvm_engine`) and QEMU
(`vmcore.qemu`). Nothing above this module knows which one runs.

Life of a kernel VM:
    template --restore()--> Machine (paused, not yet unique)
             --Machine.resume(ResumeParams)--> running, reseeded, rekeyed, clock set
    fork() is restore() + resume(); a warm pool calls restore() ahead of time.
    branch(machine) captures a running Machine and returns a new paused Machine from that state.
"""

from __future__ import annotations

import abc
import asyncio
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from vmcore.errors import EngineError
from vmcore.guest_link import GuestLink, ResumeConfirmation

# How long wait() gives a VM whose agent channel closed to finish exiting.
VM_EXIT_GRACE_S = 2.0

ProgressCallback = Callable[[str, float | None], None]
"""progress(stage description, fraction done in [0, 1] or None when unknown)."""


@dataclass(frozen=True)
class ResumeParams:
    """What makes a fork unique: sent to the guest agent once after every fork or branch."""

    key: bytes = field(default_factory=lambda: secrets.token_hex(32).encode())
    session: str = field(default_factory=lambda: str(uuid.uuid4()))
    entropy: bytes = field(default_factory=lambda: os.urandom(64))
    nonce: bytes = field(default_factory=lambda: os.urandom(16))
    # Policy that travels with the resume: host:port pairs the guest may connect to (none by
    # default: a guest has no network) and the kernel process's CPU-time limit (0: none).
    egress: tuple[tuple[str, int], ...] = ()
    cpu_time_limit_s: float = 0.0

    @staticmethod
    def wall_clock() -> float:
        """The time the guest is told; read when the message is sent, never when built."""
        return time.time()


@dataclass(frozen=True)
class TemplateInfo:
    name: str
    backend: str
    memory_mib: int
    image_hash: str
    backend_version: str
    created: float
    path: Path
    size_bytes: int


@dataclass(frozen=True)
class GuestImage:
    """Built guest artifacts (see guest-image/): a kernel and an initramfs, with their hash."""

    kernel: Path
    initramfs: Path
    image_hash: str
    cmdline: str = ""


class Machine(abc.ABC):
    """One VM. Subclasses provide the VM; this class speaks to its agent."""

    backend: str = "?"

    def __init__(self, machine_id: str, template: str) -> None:
        self.id = machine_id
        self.template = template
        self.created = time.time()
        self.link: GuestLink | None = None
        self.params: ResumeParams | None = None
        self.confirmation: ResumeConfirmation | None = None

    # --- provided by the backend -------------------------------------------------------
    @abc.abstractmethod
    async def open_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The byte stream to the guest agent (virtio-serial under QEMU, vsock under vmcore)."""

    @abc.abstractmethod
    async def start_cpus(self) -> None:
        """Let a restored (paused) VM run."""

    @abc.abstractmethod
    def poll(self) -> int | None:
        """The VM's exit status, None while it runs."""

    @abc.abstractmethod
    async def wait_vm(self) -> int:
        """Wait until the VM itself is gone; its exit status."""

    @abc.abstractmethod
    async def kill(self) -> None:
        """Stop the VM at once and release everything it holds (idempotent)."""

    @abc.abstractmethod
    def private_memory_bytes(self) -> int:
        """Memory this VM does not share with its template."""

    def end_reason(self) -> str:
        """Why the VM or its kernel ended, as far as the backend can tell ("" when unknown)."""
        return ""

    # --- common to every backend ---------------------------------------------------------
    async def resume(self, params: ResumeParams, timeout: float = 30.0) -> ResumeConfirmation:
        """Start the CPUs and make the guest unique. Raises EngineError without confirmation.

        On a guest already resumed (a warm-pool member held running) it installs `params` in
        place of the earlier ones: how a restarted kernel keeps the key its clients hold."""
        self.params = params
        if self.link is None:
            reader, writer = await self.open_channel()
            self.link = GuestLink(reader, writer, name=self.id)
            self.link.start()
            await self.start_cpus()
        try:
            self.confirmation = await asyncio.wait_for(self.link.resume(params), timeout)
        except (asyncio.TimeoutError, ConnectionError, EngineError) as exc:
            await self.kill()
            reason = "timed out" if isinstance(exc, asyncio.TimeoutError) else str(exc)
            raise EngineError(f"guest of {self.id} did not confirm its resume: {reason}") from exc
        return self.confirmation

    async def signal(self, signum: int) -> None:
        """Deliver a signal to the kernel process inside the guest."""
        if self.link is None:
            raise EngineError(f"{self.id} has not been resumed")
        await self.link.signal(signum)

    def kernel_exit_status(self) -> int | None:
        """The kernel process's exit status if it ended, else the VM's, else None."""
        if self.link is not None and self.link.kernel_exit is not None:
            return self.link.kernel_exit
        status = self.poll()
        if status is not None:
            return status if status != 0 else -9
        if self.link is not None and self.link.closed:
            return -9
        return None

    async def wait(self) -> int:
        """Wait for the kernel to end, by process exit inside the guest or by VM exit."""
        waiters = [asyncio.ensure_future(self.wait_vm())]
        if self.link is not None:
            waiters.append(asyncio.ensure_future(self.link.wait_kernel_exit()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            if self.poll() is None and self.link is not None and self.link.kernel_exit is None:
                # The channel closed without a kernel exit: the VM is going; let poll() agree.
                await asyncio.wait([waiters[0]], timeout=VM_EXIT_GRACE_S)
        finally:
            for waiter in waiters:
                waiter.cancel()
        status = self.kernel_exit_status()
        return -9 if status is None else status


class Engine(abc.ABC):
    name: str = "?"

    @property
    @abc.abstractmethod
    def backend_version(self) -> str:
        """Version of what runs the VMs; a template saved under another one is not restored."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line: what this backend runs on and with what isolation."""

    @abc.abstractmethod
    def templates(self) -> list[TemplateInfo]: ...

    @abc.abstractmethod
    async def build_template(
        self, name: str, image: GuestImage, memory_mib: int, progress: ProgressCallback
    ) -> TemplateInfo:
        """Boot the image, wait for the warm kernel, save it as template `name`."""

    def template_is_current(self, name: str) -> bool:
        """False when template `name` was built in a way this backend no longer uses."""
        return True

    @abc.abstractmethod
    def remove_template(self, name: str) -> None: ...

    @abc.abstractmethod
    async def restore(self, template: str) -> Machine:
        """A new paused VM from a template: its RAM shares the template's pages copy-on-write."""

    @abc.abstractmethod
    async def branch(self, source: Machine) -> Machine:
        """A new paused VM holding `source`'s current state; `source` keeps running."""

    async def fork(self, template: str, params: ResumeParams | None = None) -> Machine:
        machine = await self.restore(template)
        await machine.resume(params or ResumeParams())
        return machine

    async def close(self) -> None:
        """Release engine-wide resources (machines are killed by their owners)."""


