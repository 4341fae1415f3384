"""Helpers for tests that drive the QEMU engine directly: an event loop in a thread, forks with
host ports, and a blocking Jupyter client to talk to the kernel inside a fork.

The engine is asyncio; jupyter_client's BlockingKernelClient is not. The engine and the port
bridges therefore live on one event loop running in a background thread for the whole test
module, and tests call into it with LoopThread.run(). QEMU is started from that thread, and
PR_SET_PDEATHSIG is tied to the thread that forked it, so the thread lives until the end.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from jupyter_client.blocking import BlockingKernelClient

from kernelprovider import paths
from kernelprovider.zmq_bridge import KernelPortBridge
from vmcore.engine import ResumeParams
from vmcore.qemu.engine import QemuEngine, QemuMachine

T = TypeVar("T")
KERNEL_TIMEOUT_S = 120.0


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = 600.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def qemu_engine() -> QemuEngine:
    return QemuEngine(paths.template_root("qemu"))


@dataclass
class Fork:
    """A resumed machine with host ports and a connected client."""

    machine: QemuMachine
    params: ResumeParams
    bridge: KernelPortBridge
    ports: dict[str, int]
    client: BlockingKernelClient
    extra_clients: list[BlockingKernelClient] = field(default_factory=list)

    def close_clients(self) -> None:
        for client in [self.client, *self.extra_clients]:
            close_client(client)


def close_client(client: BlockingKernelClient) -> None:
    """Close a client and its ZMQ context here and now.

    Left to the garbage collector, a context whose sockets are still open terms in whatever
    thread collects it, and blocks there: in the engine's event-loop thread that hangs the tests.
    """
    try:
        client.stop_channels()
    finally:
        client.context.destroy(linger=0)


def make_client(ports: dict[str, int], key: bytes) -> BlockingKernelClient:
    client = BlockingKernelClient(ip="127.0.0.1", **ports)
    client.session.signature_scheme = "hmac-sha256"
    client.session.key = key
    # No heartbeat: under TCG a busy guest can miss heartbeats and the client gives up.
    client.start_channels(hb=False)
    return client


async def _attach(machine: QemuMachine, params: ResumeParams) -> tuple[KernelPortBridge, dict[str, int]]:
    assert machine.link is not None
    bridge = KernelPortBridge(machine.link, machine.id)
    ports = await bridge.start()
    return bridge, ports


def fork(loop: LoopThread, engine: QemuEngine, template: str, params: ResumeParams | None = None) -> Fork:
    """restore + resume + port bridge + client."""
    params = params or ResumeParams()

    async def go() -> tuple[QemuMachine, KernelPortBridge, dict[str, int]]:
        machine = await engine.restore(template)
        assert isinstance(machine, QemuMachine)
        try:
            await machine.resume(params, timeout=KERNEL_TIMEOUT_S)
            bridge, ports = await _attach(machine, params)
        except BaseException:
            await machine.kill()
            raise
        return machine, bridge, ports

    machine, bridge, ports = loop.run(go())
    return Fork(machine, params, bridge, ports, make_client(ports, params.key))


def release(loop: LoopThread, f: Fork) -> None:
    f.close_clients()

    async def go() -> None:
        await f.bridge.close()
        await f.machine.kill()

    loop.run(go())


def kernel_info(client: BlockingKernelClient, timeout: float = KERNEL_TIMEOUT_S) -> dict[str, Any]:
    return client.kernel_info(reply=True, timeout=timeout)


def execute(client: BlockingKernelClient, code: str, timeout: float = KERNEL_TIMEOUT_S) -> dict[str, Any]:
    reply = client.execute(code, reply=True, timeout=timeout, store_history=False)
    assert reply["content"]["status"] == "ok", reply["content"]
    return reply


def evaluate(client: BlockingKernelClient, code: str, expression: str, timeout: float = KERNEL_TIMEOUT_S) -> Any:
    """Run `code`, then return the value of `expression` (parsed back from its repr)."""
    reply = client.execute(
        code, reply=True, timeout=timeout, store_history=False, user_expressions={"value": expression}
    )
    content = reply["content"]
    assert content["status"] == "ok", content
    result = content["user_expressions"]["value"]
    assert result["status"] == "ok", result
    return ast.literal_eval(result["data"]["text/plain"])


def fd_count(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def wait_until(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def copy_template(source: str, name: str, **changes: Any) -> Path:
    """A private copy of template `source` under `name` in the same store, optionally with
    fields of template.json changed. Tests fork their own copy so that a concurrent rebuild of
    the shared template (another session changed the guest image) cannot swap its files
    between a test's forks; the copy maps the same guest kernel and initramfs."""
    root = paths.template_root("qemu")
    for _ in range(5):
        before = (root / source / "template.json").read_text()
        staging = root / f".building-{name}-{os.getpid()}-{time.time_ns()}"
        staging.mkdir(parents=True)
        subprocess.run(
            ["cp", "--sparse=always", str(root / source / "memory.img"), str(root / source / "state.bin"), str(staging)],
            check=True,
        )
        if (root / source / "template.json").read_text() != before:
            shutil.rmtree(staging)
            continue  # rebuilt while we copied: copy again
        record = json.loads(before)
        record.update(name=name, **changes)
        (staging / "template.json").write_text(json.dumps(record, indent=2))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.sync()  # settle the copy's block allocation (ext4 delalloc) before anyone measures it
        staging.rename(final)
        return final
    raise RuntimeError(f"template {source} kept changing while it was copied")


def remove_template(name: str) -> None:
    shutil.rmtree(paths.template_root("qemu") / name, ignore_errors=True)


def qemu_pids() -> list[int]:
    out = subprocess.run(["pgrep", "qemu-system-x86"], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]
