"""The QEMU backend of the engine interface."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

from vmcore.engine import Engine, GuestImage, Machine, ProgressCallback, TemplateInfo
from vmcore.errors import EngineError
from vmcore.guest_link import GuestLink
from vmcore.host_kvm import kvm_status
from vmcore.qemu import migration
from vmcore.qemu.process import QemuConfig, QemuProcess, host_tsc_khz, qemu_version
from vmcore.qemu.template_store import TemplateRecord, TemplateStore, check_name

log = logging.getLogger(__name__)

# Console lines that mark boot progress, with the fraction of a template build they stand for.
BOOT_MILESTONES = (
    ("Linux version", 0.05, "guest kernel starting"),
    ("Unpacking initramfs", 0.1, "unpacking the root filesystem"),
    ("Run /init", 0.3, "starting the guest agent"),
    ("host channel is", 0.35, "starting the IPython kernel"),
    ("warm kernel ready", 0.9, "warm kernel ready"),
)

# Guest console lines that say why a kernel or VM ended, most specific first.
GUEST_DEATH_MARKERS = (
    ("Out of memory: Killed process", "the guest ran out of memory and its OOM killer ended the kernel"),
    ("Attempted to kill init", "the guest agent (PID 1) exited, so the guest kernel panicked"),
    ("Kernel panic", "the guest kernel panicked"),
    ("kernel exited with status", "the kernel process exited"),
)


class QemuMachine(Machine):
    backend = "qemu"

    def __init__(self, machine_id: str, template: str, process: QemuProcess, config: QemuConfig) -> None:
        super().__init__(machine_id, template)
        self.process = process
        self.config = config
        self.last_branch_pause_s: float | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    async def open_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.process.agent_socket is not None
        return await asyncio.open_connection(sock=self.process.agent_socket, limit=1 << 22)

    async def start_cpus(self) -> None:
        assert self.process.qmp is not None
        await self.process.qmp.execute("cont")

    def poll(self) -> int | None:
        return self.process.returncode

    async def wait_vm(self) -> int:
        return await self.process.wait()

    async def kill(self) -> None:
        if self.link is not None:
            await self.link.close()
        await self.process.kill()

    def private_memory_bytes(self) -> int:
        try:
            with open(f"/proc/{self.process.pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Private_Dirty:"):
                        return int(line.split()[1]) * 1024
        except (OSError, AssertionError):
            pass
        return 0

    def diagnostics(self) -> str:
        return self.process.diagnostics()

    def end_reason(self) -> str:
        console = self.process.console_tail(16000)
        for marker, reason in GUEST_DEATH_MARKERS:
            if marker in console:
                return reason
        status = self.process.returncode
        if status is not None and status < 0:
            return f"the VM's QEMU process was killed by {signal.Signals(-status).name}"
        return ""


class QemuEngine(Engine):
    name = "qemu"

    def __init__(self, template_root: Path, accel: str | None = None) -> None:
        self.store = TemplateStore(template_root)
        self.store.clean_stale_builds()
        status = kvm_status()
        self.accel = accel or ("kvm" if status.hardware_kvm else "tcg")
        self._kvm_reason = status.reason
        self._qemu_version: str | None = None

    @property
    def backend_version(self) -> str:
        return self.qemu_version

    @property
    def qemu_version(self) -> str:
        if self._qemu_version is None:
            self._qemu_version = qemu_version()
        return self._qemu_version

    def describe(self) -> str:
        if self.accel == "kvm":
            return f"QEMU with KVM acceleration ({self._kvm_reason})"
        return f"QEMU with TCG software emulation, because {self._kvm_reason}"

    def templates(self) -> list[TemplateInfo]:
        return self.store.list()

    def template_record(self, name: str) -> TemplateRecord:
        return self.store.load(name)

    def remove_template(self, name: str) -> None:
        self.store.remove(name)

    async def build_template(
        self, name: str, image: GuestImage, memory_mib: int, progress: ProgressCallback, timeout: float = 900.0
    ) -> TemplateInfo:
        check_name(name)
        cmdline = self.kernel_cmdline(image.cmdline)
        staging = self.store.staging_directory(name)
        config = QemuConfig(
            memory_mib=memory_mib,
            memory_file=staging / "memory.img",
            accel=self.accel,
            kernel=image.kernel,
            initramfs=image.initramfs,
            cmdline=cmdline,
            share=True,
        )
        started = time.monotonic()
        progress(f"booting the guest image ({self.describe()})", 0.0)
        process = await QemuProcess.spawn(f"template {name}", config, console_lines=True)
        watcher = asyncio.ensure_future(self._report_boot(process, progress))
        try:
            reader, writer = await asyncio.open_connection(sock=process.agent_socket)
            link = GuestLink(reader, writer, f"template {name}")
            link.start()
            ready_or_exit = [asyncio.ensure_future(link.wait_ready()), asyncio.ensure_future(process.wait())]
            done, pending = await asyncio.wait(ready_or_exit, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            if not done:
                raise EngineError(f"the guest was not ready within {timeout:.0f} s: {process.diagnostics()}")
            if process.returncode is not None or ready_or_exit[0] not in done or ready_or_exit[0].exception():
                raise EngineError(f"the guest stopped before its kernel was ready: {process.diagnostics()}")
            ready = ready_or_exit[0].result()
            progress("saving the template", 0.95)
            assert process.qmp is not None
            await process.qmp.execute("stop")
            await migration.save_state(process.qmp, staging / "state.bin")
            await link.close()
        except BaseException:
            await process.kill()
            watcher.cancel()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        watcher.cancel()
        await process.kill()
        record = TemplateRecord(
            name=name,
            version=self.store.next_version(name),
            format=1,
            memory_mib=memory_mib,
            accel=self.accel,
            kernel=str(image.kernel),
            initramfs=str(image.initramfs),
            cmdline=cmdline,
            image_hash=image.image_hash,
            qemu_version=self.qemu_version,
            created=time.time(),
            boot_to_ready_s=float(ready.get("boot_to_ready_s", time.monotonic() - started)),
        )
        self.store.commit(staging, record)
        progress(f"template {name} ready (guest boot to warm kernel {record.boot_to_ready_s:.1f} s)", 1.0)
        return next(t for t in self.store.list() if t.name == name)

    def kernel_cmdline(self, base: str) -> str:
        """The image's kernel command line, plus the TSC frequency under TCG.

        A guest under TCG cannot calibrate its TSC (microvm has no HPET or PM timer, and PIT
        calibration fails under emulation), so it falls back to the jiffies clocksource, whose
        lost ticks make the clock of a busy host's forks fall seconds behind within a minute.
        TCG's guest TSC runs at the host's TSC rate, so the host's frequency is the right one.
        """
        if self.accel != "tcg":
            return base
        khz = host_tsc_khz()
        return f"{base} tsc_early_khz={khz}" if khz else base

    def template_is_current(self, name: str) -> bool:
        try:
            record = self.store.load(name)
        except EngineError:
            return False
        return record.accel != "tcg" or "tsc_early_khz=" in record.cmdline

    @staticmethod
    async def _report_boot(process: QemuProcess, progress: ProgressCallback) -> None:
        milestones = list(BOOT_MILESTONES)
        while milestones:
            line = await process.next_console_line()
            for index, (marker, fraction, stage) in enumerate(milestones):
                if marker in line:
                    progress(stage, fraction)
                    del milestones[: index + 1]
                    break

    def _config_for(self, record: TemplateRecord) -> QemuConfig:
        if record.qemu_version != self.qemu_version:
            raise EngineError(
                f"template {record.name!r} was saved by {record.qemu_version} but this host runs "
                f"{self.qemu_version}; rebuild it with `forkvm template build {record.name}`"
            )
        if record.accel != self.accel:
            raise EngineError(
                f"template {record.name!r} was saved under {record.accel.upper()} and this host uses "
                f"{self.accel.upper()}; rebuild it with `forkvm template build {record.name}`"
            )
        for path in (record.kernel, record.initramfs):
            if not Path(path).exists():
                raise EngineError(f"template {record.name!r} needs {path}, which is gone; rebuild the template")
        return QemuConfig(
            memory_mib=record.memory_mib,
            memory_file=self.store.directory(record.name) / "memory.img",
            accel=record.accel,
            kernel=Path(record.kernel),
            initramfs=Path(record.initramfs),
            cmdline=record.cmdline,
            share=False,
            incoming=True,
        )

    async def restore(self, template: str) -> Machine:
        record = self.store.load(template)
        config = self._config_for(record)
        machine_id = uuid.uuid4().hex[:12]
        process = await QemuProcess.spawn(f"vm {machine_id}", config)
        try:
            assert process.qmp is not None
            await migration.load_state(process.qmp, self.store.directory(template) / "state.bin")
        except BaseException as exc:
            diagnostics = process.diagnostics()
            await process.kill()
            if isinstance(exc, EngineError):
                raise EngineError(
                    f"restoring template {template!r} failed: {exc}; {diagnostics}; if the template is "
                    f"damaged, rebuild it with `forkvm template build --force {template}`"
                ) from exc
            raise
        return QemuMachine(machine_id, template, process, config)

    async def branch(self, source: Machine) -> Machine:
        if not isinstance(source, QemuMachine):
            raise EngineError(f"{source.id} is not a QEMU machine")
        if source.kernel_exit_status() is not None:
            raise EngineError(f"{source.id} is not running, so it cannot be branched")
        config = replace(source.config, memory_file=None, share=False, incoming=True)
        machine_id = uuid.uuid4().hex[:12]
        process = await QemuProcess.spawn(f"vm {machine_id}", config)
        workdir = Path(tempfile.mkdtemp(prefix="forkvm-branch-"))
        socket_path = workdir / "state.sock"
        assert process.qmp is not None and source.process.qmp is not None
        try:
            await migration.listen_for_state(process.qmp, socket_path)
            downtime_s = await migration.send_state_live(source.process.qmp, socket_path)
            completed = time.monotonic()
            await self._keep_running(source)
            source.last_branch_pause_s = downtime_s + (time.monotonic() - completed)
            await migration.wait_for_incoming(process.qmp)
        except BaseException as exc:
            diagnostics = process.diagnostics()
            await process.kill()
            await self._keep_running(source)
            if isinstance(exc, EngineError):
                raise EngineError(f"branching {source.id} failed: {exc}; {diagnostics}") from exc
            raise
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return QemuMachine(machine_id, source.template, process, config)

    @staticmethod
    async def _keep_running(source: QemuMachine) -> None:
        """A migration source ends paused, whatever the outcome; it must run on."""
        qmp = source.process.qmp
        if source.process.returncode is None and qmp is not None:
            status = await qmp.execute("query-status")
            if not status.get("running"):
                await qmp.execute("cont")
