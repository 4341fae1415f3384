"""Branch benchmark (prints; not a test).

    python benchmarks/branch.py [--repeats 3] [--big-memory-mib 3072] [--sizes 10MiB,1GiB]

For each live-state size: a kernel (launched through the daemon API from a template) writes
that much data (a numpy array, every page written), then is branched `--repeats` times:

  * source paused   how long the source kernel's VM was stopped (daemon's source_pause_s:
                    the migration's final stop-and-copy plus resuming the source);
  * branch ready    from the `branch` request to the branch answering kernel_info on its
                    own ports (migration of all guest RAM + resume with fresh entropy/key);

next to the fork figures of the same run, from the same template: pool-hit `launch` request
to kernel_info answered. States up to 10 MiB use the default template (1024 MiB RAM); larger
ones a template `big` with --big-memory-mib of RAM (built on first use: a few minutes).

Uses a private daemon (its own runtime directory) unless FORKVM_RUNTIME_DIR is set, and
stops it at the end; templates come from the shared cache.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from jupyter_client import BlockingKernelClient  # noqa: E402

from kernelprovider import paths  # noqa: E402
from kernelprovider.daemon_client import call_sync, daemon_running  # noqa: E402

TIMEOUT_S = 300.0
UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def parse_size(text: str) -> int:
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def human(n: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= UNITS[unit]:
            return f"{n / UNITS[unit]:g} {unit}"
    return f"{n} B"


def client(result: dict[str, Any]) -> BlockingKernelClient:
    info = dict(result["connection_info"])
    info["key"] = info["key"].encode()
    info.pop("kernel_name", None)
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    return kc


def kernel_info_answered(kc: BlockingKernelClient) -> None:
    msg_id = kc.kernel_info()
    while True:
        reply = kc.get_shell_msg(timeout=TIMEOUT_S)
        if reply["parent_header"].get("msg_id") == msg_id:
            return


def execute(kc: BlockingKernelClient, code: str) -> str:
    out: list[str] = []
    reply = kc.execute_interactive(
        code, timeout=TIMEOUT_S,
        output_hook=lambda m: out.append(m["content"].get("text", "")) if m["msg_type"] == "stream" else None,
    )  # fmt: skip
    if reply["content"]["status"] != "ok":
        raise RuntimeError(f"cell failed: {reply['content']}")
    return "".join(out)


def pool_full(template: str, timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pool = call_sync("status", autostart=False)["pools"].get(template)
        if pool is not None and pool["ready"] >= pool["size"]:
            return
        time.sleep(0.5)
    raise RuntimeError(f"the warm pool of {template!r} did not fill within {timeout:.0f} s")


def launch_timed(template: str) -> tuple[dict[str, Any], BlockingKernelClient, float, bool]:
    """Launch from `template`; (result, client, seconds to kernel_info, pool was full)."""
    try:
        pool_full(template, timeout=TIMEOUT_S if _seen_pool(template) else 0.1)
        hit = True
    except RuntimeError:
        hit = False
    started = time.monotonic()
    result = call_sync("launch", autostart=False, template=template, pool_size=1)
    kc = client(result)
    kernel_info_answered(kc)
    return result, kc, time.monotonic() - started, hit


def _seen_pool(template: str) -> bool:
    return template in call_sync("status", autostart=False)["pools"]


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values) * 1e3:8.1f} ms  min {min(values) * 1e3:8.1f} ms  max {max(values) * 1e3:8.1f} ms"


def bench_size(size: int, template: str, repeats: int) -> dict[str, list[float]]:
    figures: dict[str, list[float]] = {"fork": [], "pause": [], "branch_request": [], "branch_ready": []}
    # Fork figures: pool-hit launches of the same template (the first launch creates the pool).
    first, kc, _, _ = launch_timed(template)
    kc.stop_channels()
    call_sync("release", autostart=False, kernel_id=first["kernel_id"])
    for _ in range(repeats):
        result, kc, seconds, hit = launch_timed(template)
        if hit:
            figures["fork"].append(seconds)
        kc.stop_channels()
        call_sync("release", autostart=False, kernel_id=result["kernel_id"])

    pool_full(template)
    source, kc, _, _ = launch_timed(template)
    try:
        execute(kc, f"import numpy as np\nstate = np.ones({size // 8}, dtype=np.float64)\n")
        expected = execute(kc, "print(float(state.sum()))").strip()
        for _ in range(repeats):
            pool_full(template)  # no background restores competing for the CPUs
            started = time.monotonic()
            result = call_sync("branch", autostart=False, kernel_id=source["kernel_id"])
            requested = time.monotonic() - started
            bkc = client(result)
            kernel_info_answered(bkc)
            ready = time.monotonic() - started
            seen = execute(bkc, "print(float(state.sum()))").strip()
            if seen != expected:
                raise RuntimeError(f"branch sees {seen}, source has {expected}")
            figures["pause"].append(float(result["source_pause_s"]))
            figures["branch_request"].append(requested)
            figures["branch_ready"].append(ready)
            bkc.stop_channels()
            call_sync("release", autostart=False, kernel_id=result["kernel_id"])
    finally:
        kc.stop_channels()
        call_sync("release", autostart=False, kernel_id=source["kernel_id"])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sizes", default="10MiB,1GiB")
    parser.add_argument("--big-memory-mib", type=int, default=3072)
    args = parser.parse_args()

    private = "FORKVM_RUNTIME_DIR" not in os.environ
    if private:
        os.environ["FORKVM_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="forkvm-bench-")
    try:
        call_sync("status")  # starts the daemon
        status = call_sync("status", autostart=False)
        print(f"backend: {status['backend']} ({status['engine']}); host CPUs: {os.cpu_count()}")
        rows = []
        for text in args.sizes.split(","):
            size = parse_size(text.strip())
            if size <= 256 * 2**20:
                template = "default"
                built = call_sync("template_build", autostart=False, name=template)
            else:
                template = "big"
                print(f"template big ({args.big_memory_mib} MiB): building or checking ...", flush=True)
                built = call_sync("template_build", autostart=False, name=template, memory_mib=args.big_memory_mib)
            print(f"{human(size)} of live state, template {template} ({built['memory_mib']} MiB RAM): measuring ...", flush=True)
            rows.append((size, template, built["memory_mib"], bench_size(size, template, args.repeats)))

        print()
        for size, template, memory_mib, f in rows:
            print(f"live state {human(size)}  (template {template}, {memory_mib} MiB guest RAM, n={args.repeats})")
            print(f"  fork (pool hit) launch -> kernel_info   {stats(f['fork'])}")
            print(f"  branch: source paused                   {stats(f['pause'])}")
            print(f"  branch: request -> branch VM running    {stats(f['branch_request'])}")
            print(f"  branch: request -> kernel_info answered {stats(f['branch_ready'])}")
    finally:
        if private and daemon_running(paths.daemon_socket()):
            call_sync("stop", autostart=False)


if __name__ == "__main__":
    main()
