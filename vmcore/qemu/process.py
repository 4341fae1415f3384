"""One qemu-system-x86_64 process with its QMP, agent and console channels.

Every channel is a socketpair handed to QEMU as an inherited fd, so a VM leaves no socket
file behind, whatever way it ends. PR_SET_PDEATHSIG ties QEMU's life to the daemon's.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import mmap
import platform
import signal
import socket
import statistics
import subprocess
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from vmcore.agent_protocol import AGENT_SERIAL_PORT_NAME
from vmcore.errors import EngineError
from vmcore.qemu.qmp import QmpClient

QEMU_BINARY = "qemu-system-x86_64"
CONSOLE_TAIL_BYTES = 64 * 1024
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class QemuConfig:
    """Everything that must be identical between a template and its forks, plus `share`."""

    memory_mib: int
    memory_file: Path | None  # None: anonymous RAM (branches, whose every page comes from the stream)
    accel: str  # "kvm" or "tcg"
    kernel: Path
    initramfs: Path
    cmdline: str
    share: bool  # True: writes reach memory_file (template); False: copy-on-write (forks)
    incoming: bool = False

    def _memory_backend(self) -> str:
        if self.memory_file is None:
            return f"memory-backend-ram,id=ram,size={self.memory_mib}M"
        share = "on" if self.share else "off"
        return f"memory-backend-file,id=ram,size={self.memory_mib}M,mem-path={self.memory_file},share={share}"

    def argv(self, qmp_fd: int, agent_fd: int, console_fd: int) -> list[str]:
        if self.accel == "kvm":
            accel, cpu = ["-accel", "kvm"], "host"
        else:
            # A bounded translation buffer keeps each idle fork's private memory small.
            accel, cpu = ["-accel", "tcg,tb-size=64"], "max"
        argv = [
            QEMU_BINARY,
            "-M", "microvm,acpi=off,memory-backend=ram",
            *accel,
            "-cpu", cpu,
            "-m", f"{self.memory_mib}M",
            "-object", self._memory_backend(),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            # seccomp: a guest that took over QEMU still cannot exec, raise privileges or use
            # obsolete system calls (state files come in as fds, so nothing needs spawning).
            "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-chardev", f"socket,id=qmp,fd={qmp_fd}", "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=console,fd={console_fd}", "-serial", "chardev:console",
            "-chardev", f"socket,id=agent,fd={agent_fd}",
            "-device", "virtio-serial-device",
            "-device", f"virtserialport,chardev=agent,name={AGENT_SERIAL_PORT_NAME}",
        ]  # fmt: skip
        if self.incoming:
            argv += ["-S", "-incoming", "defer"]
        else:
            argv += ["-kernel", str(self.kernel), "-initrd", str(self.initramfs), "-append", self.cmdline]
        return argv


def qemu_version() -> str:
    try:
        out = subprocess.run([QEMU_BINARY, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise EngineError(f"{QEMU_BINARY} is not usable ({exc}); install the Debian package qemu-system-x86") from exc
    return out.splitlines()[0].strip()


def host_tsc_khz(samples: int = 5, interval_s: float = 0.1) -> int | None:
    """This host's TSC frequency in kHz, measured against CLOCK_MONOTONIC_RAW (None off x86-64).

    RDTSC runs from a tiny executable page (rdtsc; shl rdx, 32; or rax, rdx; ret); the median
    of a few short samples is good to a few parts per million.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return None
    try:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    except (OSError, ValueError):
        return None
    try:
        page.write(bytes([0x0F, 0x31, 0x48, 0xC1, 0xE2, 0x20, 0x48, 0x09, 0xD0, 0xC3]))
        buffer = ctypes.c_char.from_buffer(page)
        rdtsc = ctypes.CFUNCTYPE(ctypes.c_uint64)(ctypes.addressof(buffer))

        def read() -> tuple[float, int]:
            # The TSC read sandwiched between two clock reads; a preempted sandwich is retried.
            for _ in range(100):
                before = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
                ticks = rdtsc()
                after = time.clock_gettime_ns(time.CLOCK_MONOTONIC_RAW)
                if after - before < 20_000:
                    break
            return (before + after) / 2, ticks

        rates = []
        for _ in range(samples):
            t0, c0 = read()
            time.sleep(interval_s)
            t1, c1 = read()
            rates.append((c1 - c0) * 1_000_000 / (t1 - t0))
        del rdtsc, buffer
    finally:
        try:
            page.close()
        except BufferError:
            pass
    return round(statistics.median(rates))


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class QemuProcess:
    def __init__(self, name: str) -> None:
        self.name = name
        self.process: asyncio.subprocess.Process | None = None
        self.qmp: QmpClient | None = None
        self.agent_socket: socket.socket | None = None
        self._console_socket: socket.socket | None = None
        self._console = bytearray()
        self._stderr: deque[bytes] = deque(maxlen=200)
        self._tasks: list[asyncio.Task[None]] = []
        self._console_lines: asyncio.Queue[str] | None = None

    @classmethod
    async def spawn(cls, name: str, config: QemuConfig, console_lines: bool = False) -> QemuProcess:
        self = cls(name)
        qmp_host, qmp_vm = socket.socketpair()
        agent_host, agent_vm = socket.socketpair()
        console_host, console_vm = socket.socketpair()
        vm_ends = [qmp_vm, agent_vm, console_vm]
        try:
            self.process = await asyncio.create_subprocess_exec(
                *config.argv(qmp_vm.fileno(), agent_vm.fileno(), console_vm.fileno()),
                pass_fds=[s.fileno() for s in vm_ends],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=_die_with_parent,
            )
        except OSError as exc:
            for s in (qmp_host, agent_host, console_host):
                s.close()
            raise EngineError(f"cannot start {QEMU_BINARY}: {exc}") from exc
        finally:
            for s in vm_ends:
                s.close()
        self.agent_socket = agent_host
        self._console_socket = console_host
        if console_lines:
            self._console_lines = asyncio.Queue()
        self._tasks = [
            asyncio.ensure_future(self._collect_console(console_host)),
            asyncio.ensure_future(self._collect_stderr()),
        ]
        self.qmp = QmpClient(qmp_host, name)
        try:
            await self.qmp.connect()
        except (EngineError, OSError) as exc:
            await self.kill()
            raise EngineError(f"{name}: QEMU did not start: {self.diagnostics()}") from exc
        except BaseException:
            await self.kill()  # cancelled: no caller will ever own this process
            raise
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait(self) -> int:
        assert self.process is not None
        return await self.process.wait()

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            await self.process.wait()
        if self.qmp is not None:
            self.qmp.close()
        for sock in (self.agent_socket, self._console_socket):
            if sock is not None:
                sock.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def next_console_line(self) -> str:
        """Console output line by line (only when spawned with console_lines=True)."""
        assert self._console_lines is not None
        return await self._console_lines.get()

    def console_tail(self, limit: int = 4000) -> str:
        return self._console[-limit:].decode("utf-8", "replace")

    def diagnostics(self) -> str:
        stderr = b"".join(self._stderr).decode("utf-8", "replace").strip()
        parts = [f"exit status {self.returncode}" if self.returncode is not None else "running"]
        if stderr:
            parts.append(f"QEMU said: {stderr[-2000:]}")
        console = self.console_tail(1500).strip()
        if console:
            parts.append(f"guest console ends with:\n{console}")
        return "; ".join(parts)

    async def _collect_console(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        pending = b""
        while True:
            try:
                chunk = await loop.sock_recv(sock, 65536)
            except OSError:
                return
            if not chunk:
                return
            self._console += chunk
            del self._console[:-CONSOLE_TAIL_BYTES]
            if self._console_lines is not None:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    self._console_lines.put_nowait(line.decode("utf-8", "replace").rstrip("\r"))

    async def _collect_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        while line := await self.process.stderr.readline():
            self._stderr.append(line)
