"""The forkvm host daemon: owns templates, warm pools and kernel VMs for one user.

It serves the API described in daemon_client.py on a 0600 Unix socket in the user's runtime
directory. Kernels belong to the daemon, not to the Jupyter server that asked for them, so
they survive a server restart; they die with the daemon (QEMU has PDEATHSIG set).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import re
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator

from traitlets import Enum, Float, Int, List, Unicode
from traitlets.config import LoggingConfigurable

from vmcore.engine import Engine, Machine, ResumeParams
from vmcore.errors import EngineError
from vmcore.warm_pool import WarmPool

from kernelprovider import paths
from kernelprovider.backend_choice import BACKENDS, BackendChoice, choose_backend, create_engine
from kernelprovider.daemon_client import ALREADY_RUNNING_EXIT
from kernelprovider.kernel_identity import requested_key, requested_ports
from kernelprovider.kernels import ForkedKernel
from kernelprovider.template_policy import TemplatePolicy, load_policy, parse_egress, remove_policy, save_policy
from kernelprovider.zmq_bridge import KernelPortBridge

log = logging.getLogger("forkvm.daemon")

MAX_REQUEST_BYTES = 1 << 20
# Signals the guest agent delivers to the kernel process (forkvm_agent.kernel_process.ALLOWED_SIGNALS).
DELIVERABLE_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGUSR1})
Progress = Callable[[str, float | None], None]


class RequestError(Exception):
    """A request the daemon refuses; the message goes back to the client."""


class DaemonAlreadyRunning(Exception):
    """Another daemon holds this socket's lock."""


KERNEL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class ForkvmDaemon(LoggingConfigurable):
    backend = Enum(list(BACKENDS), default_value="auto", help="VM backend: auto picks vmcore on hardware KVM").tag(
        config=True
    )
    pool_size = Int(2, help="Forks kept ready per template").tag(config=True)
    pool_hold = Enum(["paused", "resumed"], default_value="resumed", help="State pool members wait in").tag(config=True)
    max_kernels = Int(64, help="Most kernels this user may run at once").tag(config=True)
    max_pool_size = Int(8, help="Largest warm pool a launch may ask for").tag(config=True)
    fork_concurrency = Int(
        0, help="Launches that restore and resume a VM at once, others queue (0: one per host CPU)"
    ).tag(config=True)
    default_memory_mib = Int(1024, help="Guest RAM of templates built without --memory").tag(config=True)
    resume_timeout = Float(60.0, help="Seconds a fork has to confirm its resume").tag(config=True)
    cpu_time_limit_s = Float(0.0, help="CPU seconds a kernel process may use (0: no limit)").tag(config=True)
    wall_time_limit_s = Float(0.0, help="Seconds a kernel may live before it is killed (0: no limit)").tag(config=True)
    ended_kernel_retention_s = Float(
        300.0,
        help="Seconds an ended kernel that no client released stays listed with its exit status and reason "
        "(a client such as `jupyter console` ends its kernel with a shutdown_request and never releases it)",
    ).tag(config=True)
    prewarm = List(Unicode(), default_value=["default"], help="Templates whose pools fill at daemon start").tag(
        config=True
    )
    socket_path = Unicode("", help="Unix socket to serve on (default: the runtime directory's)").tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.choice: BackendChoice = choose_backend(self.backend)
        self.engine: Engine = create_engine(self.choice)
        self.kernels: dict[str, ForkedKernel] = {}
        self.pools: dict[str, WarmPool] = {}
        self._template_builds: dict[str, asyncio.Task[Any]] = {}
        self._stopping = asyncio.Event()
        self.started = time.time()
        # Launches past the warm pool restore and resume VMs; all at once on a few cores, each
        # would take so long that every resume runs past resume_timeout. They queue instead.
        self._fork_slots = asyncio.Semaphore(self.fork_concurrency or os.cpu_count() or 1)
        # Kernel ids of launches and branches under way: they count against max_kernels, and
        # a second request for the same id must not start a second VM.
        self._launching_ids: set[str] = set()

    # --- serving --------------------------------------------------------------------------
    async def serve(self) -> None:
        path = Path(self.socket_path) if self.socket_path else paths.daemon_socket()
        # Held for the daemon's life: two daemons started at once (two notebooks opening
        # together) would each unlink the other's socket and orphan its VMs.
        lock_fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(lock_fd)
            raise DaemonAlreadyRunning(f"another forkvm daemon serves (or is starting on) {path}") from None
        if path.exists():
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._client, str(path), limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
        paths.daemon_pid_file().write_text(str(os.getpid()))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stopping.set)
        log.info("forkvm daemon %d serving %s; backend %s: %s", os.getpid(), path, self.choice.backend, self.choice.reason)
        existing = {t.name for t in self.engine.templates()}
        for name in self.prewarm:
            if name in existing and self.pool_size > 0:
                self._pool(name, self.pool_size).fill()
        try:
            await self._stopping.wait()
        finally:
            server.close()
            await self.shutdown()
            path.unlink(missing_ok=True)
            paths.daemon_pid_file().unlink(missing_ok=True)
            log.info("forkvm daemon stopped")

    async def shutdown(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        for kernel in list(self.kernels.values()):
            await self._discard(kernel)
        await self.engine.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._reply(writer, {"id": None, "error": "request too large"})
                    return
                except ConnectionError:
                    return
                if not line:
                    return
                await self._handle_line(line, writer)
        finally:
            writer.close()

    async def _handle_line(self, line: bytes, writer: asyncio.StreamWriter) -> None:
        request_id: Any = None
        try:
            try:
                request = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise RequestError(f"request is not JSON: {exc}") from exc
            if not isinstance(request, dict):
                raise RequestError("request must be a JSON object")
            request_id = request.get("id")
            method = request.get("method")
            params = request.get("params") or {}
            handler = self._handlers().get(method) if isinstance(method, str) else None
            if handler is None:
                raise RequestError(f"unknown method {method!r}")
            if not isinstance(params, dict):
                raise RequestError("params must be a JSON object")

            def progress(stage: str, fraction: float | None) -> None:
                message = {"id": request_id, "progress": {"stage": stage, "fraction": fraction}}
                if not writer.is_closing():
                    writer.write(json.dumps(message).encode() + b"\n")

            result = await handler(params, progress)
            await self._reply(writer, {"id": request_id, "result": result})
        except (RequestError, EngineError) as exc:
            await self._reply(writer, {"id": request_id, "error": str(exc)})
        except (TypeError, ValueError, KeyError, ArithmeticError, RecursionError) as exc:
            await self._reply(writer, {"id": request_id, "error": f"bad request: {type(exc).__name__}: {exc}"})
        except Exception as exc:
            log.exception("request failed")
            await self._reply(writer, {"id": request_id, "error": f"internal error: {type(exc).__name__}: {exc}"})

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, message: dict[str, Any]) -> None:
        if writer.is_closing():
            return
        writer.write(json.dumps(message).encode() + b"\n")
        try:
            await writer.drain()
        except ConnectionError:
            pass

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], Progress], Awaitable[Any]]]:
        return {
            "status": self.status,
            "launch": self.launch,
            "poll": self.poll,
            "wait": self.wait,
            "signal": self.signal,
            "kill": self.kill,
            "release": self.release,
            "list": self.list_kernels,
            "info": self.info,
            "branch": self.branch,
            "template_build": self.template_build,
            "template_list": self.template_list,
            "template_rm": self.template_rm,
            "stop": self.stop,
        }

    # --- kernels --------------------------------------------------------------------------
    def _kernel(self, params: dict[str, Any]) -> ForkedKernel:
        kernel_id = params.get("kernel_id")
        kernel = self.kernels.get(kernel_id) if isinstance(kernel_id, str) else None
        if kernel is None:
            raise RequestError(f"no forkvm kernel {kernel_id!r}")
        return kernel

    def _resume_params(self, template: str, key: str | None = None) -> ResumeParams:
        policy = load_policy(self.choice.backend, template)
        params = ResumeParams(egress=policy.egress, cpu_time_limit_s=self.cpu_time_limit_s)
        return params if key is None else dataclasses.replace(params, key=key.encode())

    def _pool(self, template: str, size: int) -> WarmPool:
        pool = self.pools.get(template)
        if pool is None:
            pool = self.pools[template] = WarmPool(
                self.engine, template, size, self.pool_hold, lambda: self._resume_params(template)
            )
        elif pool.size != size:
            pool.resize(size)
        return pool

    async def launch(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        template = str(params.get("template") or "default")
        pool_size = self._requested_pool_size(params.get("pool_size"))
        # A restart asks for the key and ports the kernel had, so its clients carry on.
        key, ports = requested_key(params.get("key")), requested_ports(params.get("ports"))
        with self._starting(params.get("kernel_id")) as kernel_id:
            started = time.monotonic()
            pool = self.pools.get(template)
            machine = self._pool(template, pool_size).take() if pool is not None else None
            async with self._fork_slots if machine is None else contextlib.nullcontext():
                if machine is None:
                    try:
                        machine = await self.engine.restore(template)
                    except EngineError:
                        # A template that cannot be restored (missing, damaged, built for another
                        # QEMU) gets no warm pool: it would retry and spawn doomed VMs forever.
                        await self._drop_pool(template)
                        raise
                kernel = await self._adopt(
                    machine, kernel_id, started, self._resume_params(template, key), rekey=key is not None, ports=ports
                )
        if template not in self.pools:
            # The template works: keep forks of it ready from now on.
            self._pool(template, pool_size).fill()
        log.info("kernel %s: vm %s from %s in %.3f s", kernel_id, machine.id, template, kernel.launch_s)
        return {**kernel.describe(), "connection_info": kernel.connection_info()}

    def _requested_pool_size(self, value: object) -> int:
        if value is None:
            return self.pool_size
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.max_pool_size:
            raise RequestError(f"pool_size must be a whole number from 0 to {self.max_pool_size} (ForkvmDaemon.max_pool_size)")
        return value

    async def _drop_pool(self, template: str) -> None:
        pool = self.pools.pop(template, None)
        if pool is not None:
            await pool.close()

    def _check_capacity(self) -> None:
        running = sum(1 for k in self.kernels.values() if k.status is None) + len(self._launching_ids)
        if running >= self.max_kernels:
            raise RequestError(
                f"this user already runs or is starting {running} forkvm kernels, the limit (ForkvmDaemon.max_kernels); "
                "shut one down first"
            )

    @contextlib.contextmanager
    def _starting(self, requested_id: object) -> Iterator[str]:
        """Admit one launch or branch: capacity, then the new kernel's id, held while it starts."""
        self._check_capacity()
        kernel_id = self._new_kernel_id(requested_id)
        self._launching_ids.add(kernel_id)
        try:
            yield kernel_id
        finally:
            self._launching_ids.discard(kernel_id)

    def _new_kernel_id(self, requested: object) -> str:
        kernel_id = str(requested or uuid.uuid4())
        if not KERNEL_ID_PATTERN.fullmatch(kernel_id):
            raise RequestError("a kernel id is 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit")
        if kernel_id in self._launching_ids:
            raise RequestError(f"kernel {kernel_id} is being started by another request")
        existing = self.kernels.get(kernel_id)
        if existing is not None:
            if existing.poll() is None:
                raise RequestError(f"kernel {kernel_id} already exists and runs")
            self._remove(existing)
        return kernel_id

    async def _adopt(
        self,
        machine: Machine,
        kernel_id: str,
        started: float,
        params: ResumeParams,
        parent: str | None = None,
        rekey: bool = False,
        ports: dict[str, int] | None = None,
    ) -> ForkedKernel:
        """Resume `machine` (again, with `params`, if `rekey`), open its host ports (`ports` when
        they are free) and register it as a kernel."""
        try:
            if machine.link is None or rekey:
                await machine.resume(params, timeout=self.resume_timeout)
            assert machine.link is not None and machine.params is not None
            bridge = KernelPortBridge(machine.link, machine.id)
            try:
                ports = await bridge.start(ports)
            except OSError as exc:
                if ports is None:
                    raise
                log.warning("kernel %s: its earlier ports are taken (%s); it gets new ones", kernel_id, exc)
                ports = await bridge.start()
        except BaseException:
            await machine.kill()
            raise
        kernel = ForkedKernel(kernel_id, machine, machine.params, bridge, ports, parent=parent)
        kernel.launch_s = time.monotonic() - started
        self.kernels[kernel_id] = kernel
        kernel.watch(self.wall_time_limit_s, on_end=self._forget_later)
        return kernel

    def _forget_later(self, kernel: ForkedKernel) -> None:
        def forget() -> None:  # never runs for a kernel already removed: _remove cancels it
            self._remove(kernel)
            log.info("kernel %s: ended %.0f s ago and never released; forgotten", kernel.id, self.ended_kernel_retention_s)

        kernel.forget_timer = asyncio.get_running_loop().call_later(self.ended_kernel_retention_s, forget)

    async def _discard(self, kernel: ForkedKernel) -> None:
        """Stop the kernel's VM and forget it now."""
        await kernel.stop_watching()
        await kernel.release()
        self._remove(kernel)

    def _remove(self, kernel: ForkedKernel) -> None:
        if self.kernels.get(kernel.id) is kernel:
            del self.kernels[kernel.id]
        kernel.remove_connection_file()
        if kernel.forget_timer is not None:
            # A cancelled timer drops its callback, and with it the kernel, at once.
            kernel.forget_timer.cancel()
            kernel.forget_timer = None

    async def branch(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        source = self._kernel(params)
        connection_dir = params.get("connection_dir")
        if connection_dir is not None and not (isinstance(connection_dir, str) and os.path.isabs(connection_dir)
                                               and os.path.isdir(connection_dir)
                                               and os.access(connection_dir, os.W_OK)):  # fmt: skip
            raise RequestError(f"connection_dir {connection_dir!r} is not an existing, writable absolute directory")
        if source.poll() is not None:
            raise RequestError(f"kernel {source.id} is dead (status {source.status}); only a running kernel can be branched")
        with self._starting(params.get("new_kernel_id")) as kernel_id:
            started = time.monotonic()
            machine = await self.engine.branch(source.machine)
            kernel = await self._adopt(machine, kernel_id, started, self._resume_params(source.machine.template), source.id)
        pause_s = getattr(source.machine, "last_branch_pause_s", None)
        log.info("kernel %s: branched from %s in %.3f s (source paused %.3f s)", kernel_id, source.id, kernel.launch_s, pause_s or 0)
        result = {**kernel.describe(), "connection_info": kernel.connection_info(), "source_pause_s": pause_s}
        if connection_dir is not None:
            try:
                result["connection_file"] = str(kernel.write_connection_file(Path(connection_dir)))
            except OSError as exc:
                await self._discard(kernel)
                raise RequestError(f"cannot write the branch's connection file in {connection_dir}: {exc}") from exc
        return result

    async def poll(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {"status": self._kernel(params).poll()}

    async def wait(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        kernel = self._kernel(params)
        timeout = params.get("timeout")
        if kernel.poll() is None and kernel._watcher is not None:
            await asyncio.wait([kernel._watcher], timeout=float(timeout) if timeout is not None else None)
        return {"status": kernel.poll()}

    async def signal(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        kernel = self._kernel(params)
        signum = int(params["signum"])
        if signum not in DELIVERABLE_SIGNALS:
            # The guest agent refuses any other signal without an answer; say so here instead
            # of reporting success for a signal that is never delivered.
            names = ", ".join(signal.Signals(s).name for s in sorted(DELIVERABLE_SIGNALS))
            raise RequestError(f"signal {signum} cannot be sent to a forkvm kernel (allowed: {names})")
        if kernel.poll() is not None:
            raise RequestError(f"kernel {kernel.id} is not running")
        if signum == signal.SIGKILL:
            await kernel.release()
        else:
            await kernel.machine.signal(signum)
        return {}

    async def kill(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        kernel = self._kernel(params)
        await kernel.release()
        return {"status": kernel.poll()}

    async def release(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        kernel = self._kernel(params)
        await self._discard(kernel)
        return {"status": kernel.status}

    async def list_kernels(self, params: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return [kernel.describe() for kernel in self.kernels.values()]

    async def info(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        kernel = self._kernel(params)
        return {**kernel.describe(), "connection_info": kernel.connection_info()}

    # --- templates and the daemon itself ----------------------------------------------------
    async def template_build(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        from kernelprovider.template_builder import build_template

        name = str(params.get("name") or "default")
        memory_mib = int(params.get("memory_mib") or self.default_memory_mib)
        force = bool(params.get("force", False))
        egress = parse_egress(list(params.get("egress") or []))
        if name in self._template_builds and not self._template_builds[name].done():
            raise RequestError(f"template {name!r} is already being built")
        pool = self.pools.pop(name, None)
        if pool is not None:
            await pool.close()
        task = asyncio.ensure_future(build_template(self.engine, name, memory_mib, force, progress))
        self._template_builds[name] = task
        result = await task
        save_policy(self.choice.backend, name, TemplatePolicy(egress=egress))
        return {**result, "egress": [f"{host}:{port}" for host, port in egress]}

    async def template_list(self, params: dict[str, Any], progress: Progress) -> list[dict[str, Any]]:
        return [
            {
                "name": t.name,
                "backend": t.backend,
                "memory_mib": t.memory_mib,
                "image_hash": t.image_hash,
                "backend_version": t.backend_version,
                "created": t.created,
                "size_bytes": t.size_bytes,
            }
            for t in self.engine.templates()
        ]

    async def template_rm(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        name = str(params["name"])
        pool = self.pools.pop(name, None)
        if pool is not None:
            await pool.close()
        self.engine.remove_template(name)
        remove_policy(self.choice.backend, name)
        return {}

    async def status(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "backend": self.choice.backend,
            "reason": self.choice.reason,
            "engine": self.engine.describe(),
            "kernels": sum(1 for k in self.kernels.values() if k.status is None),
            "pools": {name: {"ready": len(p), "size": p.size, "last_error": p.last_error} for name, p in self.pools.items()},
            "log": str(paths.daemon_log()),
        }

    async def stop(self, params: dict[str, Any], progress: Progress) -> dict[str, Any]:
        asyncio.get_running_loop().call_soon(self._stopping.set)
        return {}


def run_daemon(argv: list[str] | None = None) -> None:
    from jupyter_core.paths import jupyter_config_path
    from traitlets.config import Application

    class DaemonApp(Application):
        name = "forkvm-daemon"
        classes = [ForkvmDaemon]

    app = DaemonApp()
    app.parse_command_line(argv or [])
    # forkvm_config.py or .json in the Jupyter config directories (traitlets keeps the command
    # line's settings above the files').
    app.load_config_file("forkvm_config", path=jupyter_config_path())
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def main() -> None:
        daemon = ForkvmDaemon(parent=app)
        await daemon.serve()

    try:
        asyncio.run(main())
    except DaemonAlreadyRunning as exc:
        log.info("%s; this one exits", exc)
        raise SystemExit(ALREADY_RUNNING_EXIT) from None
