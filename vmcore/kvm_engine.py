"""The vmcore backend of the engine interface: forkvm's own VMM on /dev/kvm.

Templates live under `<root>/<name>/` as a vmcore snapshot (`memory`, `state`) plus
`template.json`. A restore is a copy-on-write fork of that snapshot on a VM from the warm pool;
the guest agent is reached over virtio-vsock through the VM's Unix socket.

On software-KVM hosts (kvm_pvm) guest user programs cannot run, so the daemon must not pick this
backend there: hardware_kvm_status() says whether it may.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from vmcore import agent_protocol as ap
from vmcore.engine import Engine, GuestImage, Machine, ProgressCallback, TemplateInfo
from vmcore.errors import EngineError
from vmcore.fork import Template, VmPool, fork
from vmcore.host_kvm import kvm_status
from vmcore.kvm import kick
from vmcore.kvm.snapshot import SnapshotError
from vmcore.linux_vm import boot_linux
from vmcore.microvm import MicroVm

BACKEND = "vmcore"
BACKEND_VERSION = "vmcore-kvm-1"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
CONNECT_RETRY_S = 0.2
BUILD_TIMEOUT_S = 900.0
_pumps: set[asyncio.Future[None]] = set()


def hardware_kvm_status() -> tuple[bool, str]:
    """(hardware KVM usable here?, why) — vmcore runs kernels only where this is True."""
    status = kvm_status()
    return status.hardware_kvm, status.reason


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    memory_mib: int
    image_hash: str
    kernel: str
    initramfs: str
    cmdline: str
    backend_version: str
    created: float
    boot_to_ready_s: float


async def connect_vsock(path: Path, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A byte stream to guest `port` through the VM's vsock Unix socket.

    Returns as soon as the request is sent: the guest may still be paused and can only answer
    once its CPUs run. The "OK <port>" line is consumed before any data reaches the reader; a
    refusal shows as end of stream."""
    raw_reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(f"CONNECT {port}\n".encode())
    await writer.drain()
    reader = asyncio.StreamReader()

    async def pump() -> None:
        try:
            line = await raw_reader.readline()
            if line.startswith(b"OK "):
                while chunk := await raw_reader.read(1 << 16):
                    reader.feed_data(chunk)
        except ConnectionError:
            pass
        finally:
            reader.feed_eof()

    task = asyncio.ensure_future(pump())
    _pumps.add(task)  # the loop keeps only weak references to tasks
    task.add_done_callback(_pumps.discard)
    return reader, writer


class KvmMachine(Machine):
    backend = BACKEND

    def __init__(self, machine_id: str, template: str, vm: MicroVm, vsock_path: Path) -> None:
        super().__init__(machine_id, template)
        self.vm = vm
        self.vsock_path = vsock_path

    async def open_channel(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await connect_vsock(self.vsock_path, ap.AGENT_VSOCK_PORT)
        except OSError as exc:
            raise EngineError(f"{self.id}: cannot reach the guest's vsock: {exc}") from exc

    async def start_cpus(self) -> None:
        self.vm.start()

    def poll(self) -> int | None:
        return self.vm.exit_status

    async def wait_vm(self) -> int:
        while not await asyncio.get_running_loop().run_in_executor(None, self.vm.wait, 1.0):
            pass
        status = self.vm.exit_status
        return -9 if status is None else status

    async def kill(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.vm.kill)
        self.vsock_path.unlink(missing_ok=True)

    def private_memory_bytes(self) -> int:
        return self.vm.private_memory_bytes() if self.vm.vm.fd >= 0 else 0


class KvmEngine(Engine):
    name = BACKEND

    def __init__(self, root: Path, pool_size: int = 4, runtime_dir: Path | None = None) -> None:
        kick.install()  # the vCPU kick signal's handler must come from the main thread
        self.root = root
        self.runtime_dir = runtime_dir or Path(tempfile.mkdtemp(prefix="vmcore-"))
        self.runtime_dir.mkdir(parents=True, exist_ok=True)
        self.pool = VmPool(pool_size)
        self._templates: dict[str, tuple[float, Template]] = {}

    @property
    def backend_version(self) -> str:
        return BACKEND_VERSION

    def describe(self) -> str:
        usable, reason = hardware_kvm_status()
        return f"vmcore KVM VMM ({'usable' if usable else 'not usable'}: {reason})"

    # --- templates -------------------------------------------------------------------------------
    def _directory(self, name: str) -> Path:
        if not _NAME.match(name):
            raise EngineError(f"invalid template name {name!r}")
        return self.root / name

    def _record(self, name: str) -> TemplateRecord:
        try:
            return TemplateRecord(**json.loads((self._directory(name) / "template.json").read_text()))
        except FileNotFoundError:
            raise EngineError(f"no vmcore template named {name!r}") from None
        except (ValueError, TypeError) as exc:
            raise EngineError(f"template {name!r} is damaged ({exc}); rebuild it") from exc

    def templates(self) -> list[TemplateInfo]:
        infos = []
        for directory in sorted(self.root.glob("*/template.json")):
            try:
                record = self._record(directory.parent.name)
            except EngineError:
                continue
            size = sum(f.stat().st_blocks * 512 for f in directory.parent.iterdir() if f.is_file())
            infos.append(TemplateInfo(
                name=record.name, backend=BACKEND, memory_mib=record.memory_mib,
                image_hash=record.image_hash, backend_version=record.backend_version,
                created=record.created, path=directory.parent, size_bytes=size,
            ))
        return infos

    def remove_template(self, name: str) -> None:
        directory = self._directory(name)
        if not directory.exists():
            raise EngineError(f"no vmcore template named {name!r}")
        self._templates.pop(name, None)
        shutil.rmtree(directory)  # running forks keep their private mappings of the memory file

    async def build_template(
        self, name: str, image: GuestImage, memory_mib: int, progress: ProgressCallback
    ) -> TemplateInfo:
        final = self._directory(name)
        staging = self.root / f".building-{name}-{time.time_ns()}"
        staging.mkdir(parents=True)
        kernel = image.kernel.parent / "vmlinux" if (image.kernel.parent / "vmlinux").exists() else image.kernel
        vsock_path = self.runtime_dir / f"build-{name}.sock"
        started = time.monotonic()
        progress("booting the guest kernel", None)
        vm = boot_linux(kernel, image.initramfs, image.cmdline, memory_mib, vsock_path, name=f"build-{name}")
        try:
            vm.start()
            try:
                ready = await asyncio.wait_for(self._wait_ready(vm, vsock_path, progress), BUILD_TIMEOUT_S)
            except asyncio.TimeoutError:
                raise EngineError(
                    f"the guest agent was not ready within {BUILD_TIMEOUT_S:.0f} s "
                    f"({hardware_kvm_status()[1]})"
                ) from None
            progress("saving the snapshot", None)
            await asyncio.get_running_loop().run_in_executor(None, vm.snapshot, staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        finally:
            vm.kill()
            vsock_path.unlink(missing_ok=True)
        record = TemplateRecord(
            name=name, memory_mib=memory_mib, image_hash=image.image_hash, kernel=str(kernel),
            initramfs=str(image.initramfs), cmdline=image.cmdline, backend_version=BACKEND_VERSION,
            created=time.time(), boot_to_ready_s=float(ready.get("boot_to_ready_s", time.monotonic() - started)),
        )
        (staging / "template.json").write_text(json.dumps(asdict(record), indent=2))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        self._templates.pop(name, None)
        progress("template ready", 1.0)
        return next(info for info in self.templates() if info.name == name)

    async def _wait_ready(self, vm: MicroVm, vsock_path: Path, progress: ProgressCallback) -> dict:
        """Connect to the agent (retrying until it listens), wait for READY, then QUIESCE."""
        while True:
            if vm.exit_status is not None:
                raise EngineError(f"guest stopped while booting: {vm.exit_reason}")
            reader, writer = await connect_vsock(vsock_path, ap.AGENT_VSOCK_PORT)
            frames = ap.FrameReader()
            ready: dict | None = None
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                frames.feed(data)
                for frame in frames.frames():
                    if isinstance(frame, ap.ProtocolError):
                        continue
                    if frame.type == ap.FrameType.READY:
                        ready = frame.json()
                        progress("warm kernel ready; quiescing", None)
                        writer.write(ap.encode_json(ap.FrameType.QUIESCE, {}))
                    elif frame.type == ap.FrameType.QUIESCED and ready is not None:
                        writer.close()
                        vm.pause()
                        return ready
            writer.close()
            await asyncio.sleep(CONNECT_RETRY_S)

    # --- forks -------------------------------------------------------------------------------------
    def _template(self, name: str) -> Template:
        directory = self._directory(name)
        record = self._record(name)
        if record.backend_version != BACKEND_VERSION:
            raise EngineError(
                f"template {name!r} was saved by {record.backend_version}, this is "
                f"{BACKEND_VERSION}; rebuild it"
            )
        try:
            mtime = (directory / "state").stat().st_mtime
            cached = self._templates.get(name)
            if cached is None or cached[0] != mtime:
                cached = (mtime, Template.load(directory))
                self._templates[name] = cached
        except (OSError, SnapshotError) as exc:
            raise EngineError(f"vmcore template {name!r} cannot be used: {exc}") from exc
        return cached[1]

    def _fork(self, template: Template, template_name: str) -> KvmMachine:
        machine_id = f"vm-{uuid.uuid4().hex[:12]}"
        vsock_path = self.runtime_dir / f"{machine_id}.sock"
        vm = fork(template, self.pool, name=machine_id, vsock_path=vsock_path)
        return KvmMachine(machine_id, template_name, vm, vsock_path)

    async def restore(self, template: str) -> Machine:
        return self._fork(self._template(template), template)

    async def branch(self, source: Machine) -> Machine:
        if not isinstance(source, KvmMachine):
            raise EngineError("vmcore can only branch its own machines")
        was_running = source.vm.running
        with tempfile.TemporaryDirectory(dir=self.runtime_dir) as directory:
            source.vm.snapshot(Path(directory))
            if was_running:
                source.vm.start()
            # The fork maps the memory file; it stays valid after the directory is removed.
            return self._fork(Template.load(Path(directory)), source.template)

    async def close(self) -> None:
        self.pool.close()
