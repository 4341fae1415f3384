"""Issue 7, item 10: many kernels at once, all answering correctly.

FORKVM_LOAD_KERNELS kernels (default 50) are launched concurrently with AsyncKernelManager,
then all execute a numpy cell at the same moment; each must return its own correct answer.
Under TCG on two shared cores this takes minutes: the timeouts are large on purpose. The pool
size is the default one.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from jupyter_client import AsyncKernelManager

from kernelprovider.daemon_client import DaemonClient
from tests.security_support import env_int

pytestmark = [pytest.mark.slow]

KERNELS = env_int("FORKVM_LOAD_KERNELS", 50)
START_TIMEOUT_S = 1200
CELL_TIMEOUT_S = 1200


def _expected(n: int) -> int:
    return sum(i * i for i in range(n))


async def _start(index: int) -> tuple[AsyncKernelManager, Any]:
    km = AsyncKernelManager(kernel_name="forkvm")
    await km.start_kernel()
    kc = km.client()
    kc.start_channels(hb=False)
    await kc.wait_for_ready(timeout=START_TIMEOUT_S)
    return km, kc


async def _numpy_cell(kc: Any, n: int) -> int:
    reply = await kc.execute_interactive(
        f"import numpy as np\n_a = np.arange({n}, dtype=np.int64)\n_r = int((_a * _a).sum())",
        timeout=CELL_TIMEOUT_S,
        user_expressions={"r": "_r"},
        store_history=False,
    )
    content = reply["content"]
    assert content["status"] == "ok", content
    return int(content["user_expressions"]["r"]["data"]["text/plain"])


@pytest.mark.timeout(3600)
def test_many_kernels_execute_numpy_at_once(forkvm_template: str, artifacts_dir: Path) -> None:
    async def scenario() -> dict[str, float]:
        started = time.monotonic()
        results = await asyncio.gather(*(_start(i) for i in range(KERNELS)), return_exceptions=True)
        launched = time.monotonic() - started
        kernels = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        try:
            assert not errors, f"{len(errors)} of {KERNELS} kernels did not start: {errors[:3]!r}"
            running = {k["kernel_id"] for k in await DaemonClient(autostart=False).call("list") if k["status"] is None}
            assert {km.kernel_id for km, _ in kernels} <= running
            sizes = [100_000 + index for index in range(KERNELS)]
            cell_started = time.monotonic()
            answers = await asyncio.gather(*(_numpy_cell(kc, n) for (_, kc), n in zip(kernels, sizes)))
            executed = time.monotonic() - cell_started
            assert answers == [_expected(n) for n in sizes]
            for km, _ in kernels:
                assert await km.is_alive()
            return {"launch_all_s": launched, "execute_all_s": executed}
        finally:
            for _, kc in kernels:
                kc.stop_channels()
            await asyncio.gather(*(km.shutdown_kernel(now=True) for km, _ in kernels), return_exceptions=True)

    figures = asyncio.run(scenario())
    report = f"{KERNELS} kernels: launched in {figures['launch_all_s']:.1f} s, numpy cell in all in {figures['execute_all_s']:.1f} s"
    print(report)
    (artifacts_dir / "load.txt").write_text(report + "\n")
