"""The IPython kernel process the agent starts, warms, resumes, signals and reaps."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from forkvm_agent.agent_protocol import GUEST_KERNEL_PORTS

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/forkvm")
# Signals the host may deliver; anything else is refused so the host API cannot be used as a
# generic kill switch for arbitrary behaviour.
ALLOWED_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGQUIT, signal.SIGUSR1})


class KernelProcess:
    def __init__(self, run_dir: Path = RUN_DIR) -> None:
        self.run_dir = run_dir
        self.connection_file = run_dir / "kernel.json"
        self.resume_socket = run_dir / "resume.sock"
        self.process: subprocess.Popen[bytes] | None = None
        self.exit_status: int | None = None
        self.exited = asyncio.Event()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        connection = {f"{name}_port": port for name, port in GUEST_KERNEL_PORTS.items()}
        connection.update(
            ip="127.0.0.1",
            transport="tcp",
            signature_scheme="hmac-sha256",
            # Replaced on every resume; this one only ever protects the template's warm-up.
            key=secrets.token_hex(32),
            kernel_name="python3",
        )
        self.connection_file.write_text(json.dumps(connection))
        self.connection_file.chmod(0o600)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "forkvm_agent.kernel_launcher", str(self.connection_file), str(self.resume_socket)],
            stdin=subprocess.DEVNULL,
            cwd=os.environ.get("HOME", "/"),
        )

    def reaped(self, status: int) -> None:
        """Called by the agent's SIGCHLD reaper when the kernel process is gone."""
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.exited.set()

    async def warm_up(self, timeout: float = 600.0) -> dict[str, Any]:
        """Run real requests through the kernel so everything a first request imports is loaded."""
        return await asyncio.to_thread(self._warm_up_blocking, timeout)

    def _warm_up_blocking(self, timeout: float) -> dict[str, Any]:
        from jupyter_client.blocking import BlockingKernelClient

        client = BlockingKernelClient(connection_file=str(self.connection_file))
        client.load_connection_file()
        # No heartbeat: under emulation the kernel takes longer to start than the heartbeat
        # allows, and wait_for_ready() would call it dead. ZMQ queues requests until it binds.
        client.start_channels(hb=False)
        try:
            info = client.kernel_info(reply=True, timeout=timeout)
            # store_history=False keeps the user's first cell at In [1].
            client.execute("pass", silent=True, store_history=False, reply=True, timeout=timeout)
            client.complete("import nu", reply=True, timeout=timeout)
            # A name completion goes through jedi, whose first use parses the builtins stubs:
            # over a minute under emulation. In the template it is paid once for every fork.
            client.complete("zi", reply=True, timeout=timeout)
            # The first exception a kernel shows loads IPython's traceback machinery, about a
            # second under emulation: pay it here, once, so a user's first error or interrupt
            # (KeyboardInterrupt) is quick. Then forget it, so %tb has nothing to show.
            client.execute("raise KeyboardInterrupt", store_history=False, stop_on_error=False, reply=True, timeout=timeout)
            client.execute(
                "import sys\nfor _n in ('last_type', 'last_value', 'last_traceback', 'last_exc'):\n"
                "    sys.__dict__.pop(_n, None)\ndel _n, sys",
                silent=True, store_history=False, reply=True, timeout=timeout,
            )  # fmt: skip
            return dict(info["content"])
        finally:
            client.stop_channels()
            client.context.term()

    async def resume(self, request: dict[str, Any]) -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(self.resume_socket))
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            answer = json.loads(await reader.readline())
        finally:
            writer.close()
        if "error" in answer:
            raise RuntimeError(f"kernel process refused resume: {answer['error']}")
        return answer

    def limit_cpu_time(self, seconds: float) -> None:
        """Cap the kernel's CPU time from now on; past it the kernel gets SIGXCPU, then SIGKILL."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        # utime and stime, fields 14 and 15 of /proc/PID/stat, counted after the command name.
        used = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        soft = int(used + seconds) + 1
        resource.prlimit(self.pid, resource.RLIMIT_CPU, (soft, soft + 2))

    def send_signal(self, signum: int) -> None:
        if signum not in ALLOWED_SIGNALS:
            raise ValueError(f"signal {signum} is not deliverable to the kernel")
        if self.process is None or self.exit_status is not None:
            raise ProcessLookupError("the kernel process is not running")
        os.kill(self.process.pid, signum)
