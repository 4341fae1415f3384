"""KvmEngine: the engine interface over vmcore, on real /dev/kvm."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

from tests.vmcore import synthetic
from vmcore.engine import Machine, ResumeParams
from vmcore.errors import EngineError
from vmcore.kvm_engine import BACKEND_VERSION, KvmEngine, KvmMachine, hardware_kvm_status

pytestmark = pytest.mark.usefixtures("kvm_available")


def test_hardware_kvm_status_names_the_reason():
    usable, reason = hardware_kvm_status()
    assert isinstance(usable, bool) and reason
    with open("/proc/cpuinfo") as cpuinfo:
        has_vt = any(flag in cpuinfo.read().split() for flag in ("vmx", "svm"))
    if not has_vt:
        assert not usable and "vmx/svm" in reason
    if Path("/sys/module/kvm_pvm").exists() and not has_vt:
        assert "kvm_pvm" in reason


def _synthetic_template(root: Path, name: str) -> None:
    """A template directory holding a synthetic guest instead of a booted kernel."""
    directory = root / name
    synthetic.make_snapshot(directory, steps=3, memory_mib=4)
    (directory / "template.json").write_text(json.dumps({
        "name": name, "memory_mib": 4, "image_hash": "synthetic", "kernel": "", "initramfs": "",
        "cmdline": "", "backend_version": BACKEND_VERSION, "created": time.time(), "boot_to_ready_s": 0.0,
    }))


@pytest.fixture
def engine(tmp_path):
    engine = KvmEngine(tmp_path / "templates", pool_size=2, runtime_dir=tmp_path / "run")
    _synthetic_template(tmp_path / "templates", "synthetic")
    yield engine
    asyncio.run(engine.close())


def test_templates_listed_and_removed(engine):
    (info,) = engine.templates()
    assert info.name == "synthetic" and info.backend == "vmcore" and info.size_bytes > 0
    engine.remove_template("synthetic")
    assert engine.templates() == []
    with pytest.raises(EngineError):
        engine.remove_template("synthetic")
    with pytest.raises(EngineError):
        asyncio.run(engine.restore("synthetic"))
    with pytest.raises(EngineError):
        asyncio.run(engine.restore("../etc"))


def test_restore_start_branch_kill(engine):
    async def scenario() -> None:
        machine = await engine.restore("synthetic")
        assert isinstance(machine, KvmMachine) and isinstance(machine, Machine)
        assert machine.poll() is None
        await machine.start_cpus()
        await asyncio.sleep(0.05)
        counter = machine.vm.memory.read_u64(synthetic.COUNTER)
        assert counter > 3, "the restored guest did not run"
        branch = await engine.branch(machine)
        assert machine.vm.running, "the source keeps running after a branch"
        branched_at = branch.vm.memory.read_u64(synthetic.COUNTER)
        assert branched_at >= counter
        await asyncio.sleep(0.02)
        assert branch.vm.memory.read_u64(synthetic.COUNTER) == branched_at  # paused until started
        await branch.start_cpus()
        await asyncio.sleep(0.05)
        assert branch.vm.memory.read_u64(synthetic.COUNTER) > branched_at
        assert 0 < machine.private_memory_bytes() < 4 << 20
        waiter = asyncio.ensure_future(machine.wait_vm())
        await machine.kill()
        assert await asyncio.wait_for(waiter, 5) == -9
        assert machine.poll() == -9
        await machine.kill()  # idempotent
        await branch.kill()

    asyncio.run(scenario())


def test_resume_without_agent_fails_cleanly(engine):
    """A synthetic guest has no vsock agent: resume must fail with EngineError, VM killed."""

    async def scenario() -> None:
        machine = await engine.restore("synthetic")
        with pytest.raises(EngineError):
            await machine.resume(ResumeParams(), timeout=1)
        await machine.kill()

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.hardware_kvm
def test_end_to_end_kernel_info_over_vsock(tmp_path):
    usable, reason = hardware_kvm_status()
    if not usable:
        pytest.skip(f"vmcore end-to-end needs hardware KVM: {reason}")
    import forkvm_image
    from tests import vm_helpers as vh
    from kernelprovider.zmq_bridge import KernelPortBridge

    image = forkvm_image.build_image()
    loop = vh.LoopThread()
    engine = KvmEngine(tmp_path / "templates", runtime_dir=tmp_path / "run")
    try:
        loop.run(engine.build_template("e2e", image, 1024, lambda stage, fraction: None))
        params = ResumeParams()

        async def go():
            machine = await engine.restore("e2e")
            await machine.resume(params, timeout=120)
            bridge = KernelPortBridge(machine.link, machine.id)
            return machine, bridge, await bridge.start()

        machine, bridge, ports = loop.run(go())
        client = vh.make_client(ports, params.key)
        try:
            reply = vh.kernel_info(client)
            assert reply["content"]["status"] == "ok"
            assert reply["header"]["session"] == params.session
        finally:
            client.stop_channels()
            loop.run(bridge.close())
            loop.run(machine.kill())
    finally:
        loop.run(engine.close())
        loop.close()
