"""Issue 7, item 1: every fork and every branch has its own randomness.

Forks of one snapshot start with identical memory: the kernel CRNG, `random`, numpy's global
RandomState and any Generator made before the snapshot (forkvm_agent.template_state holds one
of each kind on purpose) would repeat the same streams unless the resume reseeds them. A fork
whose guest does not confirm the reseed must fail and leave nothing behind.
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import pytest
from jupyter_client import KernelManager

import vmcore.guest_link
from tests.security_support import (
    KERNEL_START_TIMEOUT_S,
    client,
    env_int,
    evaluate,
    fd_count,
    kernel_manager,
    pid_alive,
)
from tests.vm_helpers import LoopThread, qemu_engine
from vmcore.engine import ResumeParams
from vmcore.errors import EngineError

pytestmark = [pytest.mark.slow]

FORKS = env_int("FORKVM_SECURITY_FORKS", 10)
BRANCHES = env_int("FORKVM_SECURITY_BRANCHES", 3)

# One cell, run first in every kernel: everything that must differ between forks.
PROBE = """
import os, random, uuid, numpy
from forkvm_agent import template_state
_probe = {
    "urandom": os.urandom(16).hex(),
    "random": random.random(),
    "numpy_global": float(numpy.random.random()),
    "numpy_default_rng": float(numpy.random.default_rng().random()),
    "template_rng": float(template_state.rng.random()),
    "template_random": template_state.py_random.random(),
    "uuid4": str(uuid.uuid4()),
    "boot_id": open("/proc/sys/kernel/random/boot_id").read().strip(),
}
"""


def _probe(kc: Any) -> dict[str, Any]:
    return evaluate(kc, PROBE, "_probe")


def _assert_pairwise_distinct(probes: dict[str, dict[str, Any]]) -> None:
    assert len(probes) >= 2
    keys = next(iter(probes.values())).keys()
    for key in keys:
        for (a, pa), (b, pb) in itertools.combinations(probes.items(), 2):
            assert pa[key] != pb[key], f"{key} is the same in {a} and {b}: {pa[key]!r}"


@pytest.mark.timeout(3600)
def test_forks_and_branches_have_distinct_randomness(forkvm_template: str) -> None:
    managers: dict[str, KernelManager] = {}
    clients: dict[str, Any] = {}
    try:
        for index in range(FORKS):
            km = kernel_manager(forkvm_template)
            km.start_kernel()
            managers[f"fork{index}"] = km
            clients[f"fork{index}"] = client(km)
        # Branch a kernel that has run user code but never read boot_id: Linux creates the boot
        # id on first read and keeps it for the boot, and a branch continues the same boot.
        source = clients["fork0"]
        evaluate(source, "branch_marker = 'from fork0'", "branch_marker")
        for index in range(BRANCHES):
            km = kernel_manager(forkvm_template)
            km.start_kernel(branch_from=managers["fork0"].kernel_id)
            managers[f"branch{index}"] = km
            clients[f"branch{index}"] = client(km)
            assert evaluate(clients[f"branch{index}"], "", "branch_marker") == "from fork0"
        probes = {name: _probe(kc) for name, kc in clients.items()}
        _assert_pairwise_distinct(probes)
        for name, probe in probes.items():
            assert len(probe["boot_id"]) == 36, (name, probe)
    finally:
        for kc in clients.values():
            kc.stop_channels()
        for km in managers.values():
            try:
                km.shutdown_kernel(now=True)
            except Exception:
                pass


# --- a fork that does not confirm its reseed -------------------------------------------------
@pytest.fixture(scope="module")
def loop() -> Any:
    loop = LoopThread()
    yield loop
    loop.close()


def _bad_proof(key: bytes, nonce: bytes) -> str:
    return "0" * 64


@pytest.mark.parametrize("failure", ["short_entropy", "wrong_proof"])
def test_unconfirmed_reseed_fails_and_leaves_nothing(
    forkvm_template: str, loop: LoopThread, failure: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = qemu_engine()
    fds_before = fd_count()
    if failure == "short_entropy":
        # The agent refuses RESUME with less than 32 bytes of entropy: no RESUMED ever comes.
        params = ResumeParams(entropy=os.urandom(16))
    else:
        # The guest answers, but its proof does not verify (as if it had not installed the key).
        monkeypatch.setattr(vmcore.guest_link, "resume_proof", _bad_proof)
        params = ResumeParams()

    async def attempt() -> tuple[Any, BaseException | None, float]:
        machine = await engine.restore(forkvm_template)
        started = time.monotonic()
        try:
            await machine.resume(params, timeout=KERNEL_START_TIMEOUT_S)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            return machine, exc, time.monotonic() - started
        await machine.kill()
        return machine, None, time.monotonic() - started

    machine, error, elapsed = loop.run(attempt())
    assert isinstance(error, EngineError), f"resume with {failure} did not fail: {error!r}"
    assert "did not confirm" in str(error)
    if failure == "short_entropy":
        # The guest's refusal ends the wait at once instead of running into the timeout.
        assert "entropy" in str(error), str(error)
        assert elapsed < 30, f"refused resume took {elapsed:.1f} s to fail"
    # Nothing left: the QEMU process is gone and reaped, the channel closed, no fd kept.
    assert machine.poll() is not None, "QEMU still runs after a failed resume"
    assert not pid_alive(machine.pid)
    assert machine.link is not None and machine.link.closed
    assert fd_count() <= fds_before, f"fds before {fds_before}, after {fd_count()}"
    loop.run(engine.close())
