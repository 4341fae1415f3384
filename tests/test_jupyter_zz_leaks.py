"""Issue 4: after the Jupyter provider tests (this file sorts last among them), the test daemon
holds no kernel, and its only VMs are the warm pool's. conftest's forkvm_runtime then stops the
daemon and fails the session if any of its QEMU processes survives it."""

from __future__ import annotations

import pytest

from kernelprovider.daemon_client import call_sync
from tests.jupyter_support import SEEN_QEMU_PIDS, daemon_kernels, pid_alive, pool_settled, qemu_children, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("forkvm_template")]


def test_no_kernel_or_vm_left_behind() -> None:
    # Every kernel the tests started has ended. (A client that ends its kernel with a
    # shutdown_request alone, as `jupyter console` does at exit, never asks the daemon to
    # release it: such a kernel stays listed as exited, and its VM must be gone.)
    def running() -> list[dict]:
        return [k for k in daemon_kernels() if k["status"] is None]

    assert wait_until(lambda: not running(), 60), running()
    for kernel in daemon_kernels():
        assert kernel["pid"] is None or not pid_alive(kernel["pid"]), f"the VM of ended kernel {kernel} still runs"
    for template in call_sync("status", autostart=False)["pools"]:
        pool_settled(template)

    def accounted() -> bool:
        pools = call_sync("status", autostart=False)["pools"]
        return len(qemu_children()) == sum(p["ready"] for p in pools.values())

    assert wait_until(accounted, 60), (
        f"daemon QEMU children {sorted(qemu_children())} vs pools {call_sync('status', autostart=False)['pools']}"
    )
    current = qemu_children()
    gone = [pid for pid in SEEN_QEMU_PIDS - current if pid_alive(pid)]
    assert not gone, f"QEMU processes {gone} left the daemon's care but still run"
