"""Issue 7, items 2 and 3: a fork's clock is the host's, and each kernel has its own key and session.

Clock: a template's saved wall clock is as old as the template; the resume steps it to the
host's before any user cell runs. Keys: each kernel's HMAC key and session id are made for it
at resume; the kernel itself verifies every signature (the host ports pass ZMTP bytes
untouched), so a message signed with another kernel's key is dropped.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from jupyter_client.blocking import BlockingKernelClient

from kernelprovider.daemon_client import call_sync
from tests.security_support import (
    CELL_TIMEOUT_S,
    daemon_kernel,
    evaluate,
    forkvm_kernel,
    run_cell,
)

pytestmark = [pytest.mark.slow]

MIN_TEMPLATE_AGE_S = 10.0


def test_first_cell_sees_host_wall_clock(forkvm_template: str) -> None:
    template = next(t for t in call_sync("template_list", autostart=False) if t["name"] == forkvm_template)
    # The guest clock stood still at the snapshot: make sure the template is old enough that
    # an unset clock would be caught, then check the very first cell of a new kernel.
    age = time.time() - template["created"]
    if age < MIN_TEMPLATE_AGE_S:
        time.sleep(MIN_TEMPLATE_AGE_S - age)
    age = time.time() - template["created"]
    with forkvm_kernel(forkvm_template) as (_, kc):
        before = time.time()
        guest = evaluate(kc, "", "__import__('time').time()")
        after = time.time()
    assert before - 2.0 < guest < after + 2.0, (
        f"guest time {guest:.3f} vs host {before:.3f}..{after:.3f} (template {age:.0f} s old)"
    )


def _iopub_sessions(kc: BlockingKernelClient, timeout: float = CELL_TIMEOUT_S) -> set[str]:
    sessions: set[str] = set()
    kc.execute_interactive("1", timeout=timeout, output_hook=lambda m: sessions.add(m["header"]["session"]))
    return sessions


def test_each_kernel_has_its_own_key_and_session(forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (km_a, kc_a), forkvm_kernel(forkvm_template) as (km_b, kc_b):
        key_a, key_b = km_a.session.key, km_b.session.key
        assert key_a and key_b and key_a != key_b
        assert len(key_a) >= 32
        sessions_a, sessions_b = _iopub_sessions(kc_a), _iopub_sessions(kc_b)
        # Every message the kernel sends carries its own session id, the one the daemon made.
        assert len(sessions_a) == 1 and len(sessions_b) == 1, (sessions_a, sessions_b)
        assert sessions_a != sessions_b
        assert sessions_a == {daemon_kernel(km_a.kernel_id)["session"]}
        assert sessions_b == {daemon_kernel(km_b.kernel_id)["session"]}
        # The client's own session id is not the kernel's: the kernel's comes from the resume.
        assert kc_a.session.session not in sessions_a


def _client(info: dict[str, Any], key: bytes) -> BlockingKernelClient:
    ports = {k: v for k, v in info.items() if k.endswith("_port")}
    kc = BlockingKernelClient(ip="127.0.0.1", key=key, signature_scheme="hmac-sha256", **ports)
    kc.session.key = key
    kc.start_channels(hb=False)
    return kc


def test_message_signed_with_another_kernels_key_is_ignored(forkvm_template: str) -> None:
    with forkvm_kernel(forkvm_template) as (km_a, kc_a), forkvm_kernel(forkvm_template) as (km_b, _):
        info_a = km_a.get_connection_info()
        forged = _client(info_a, km_b.session.key)
        try:
            token = uuid.uuid4().hex
            msg_id = forged.execute(f"forged = {token!r}")
            with pytest.raises(Exception) as waited:  # queue.Empty: no reply at all
                forged.get_shell_msg(timeout=5)
            assert type(waited.value).__name__ == "Empty", waited.value
            # The kernel did not run it: the variable does not exist in kernel A.
            reply, _ = run_cell(kc_a, "print('forged' in globals())")
            assert reply["content"]["status"] == "ok"
            assert evaluate(kc_a, "", "'forged' in globals()") is False
            assert msg_id
        finally:
            forged.stop_channels()
        # The same request signed with A's own key, on the same ports, is answered.
        genuine = _client(info_a, km_a.session.key)
        try:
            genuine.execute("genuine = 1")
            reply = genuine.get_shell_msg(timeout=CELL_TIMEOUT_S)
            assert reply["content"]["status"] == "ok"
            assert evaluate(kc_a, "", "genuine") == 1
        finally:
            genuine.stop_channels()
