"""Jupyter server extension: branch a running forkvm kernel over the REST API.

    POST {base_url}api/forkvm/kernels/<kernel_id>/branch

asks the server's MultiKernelManager to start a new kernel with `branch_from=<kernel_id>`: the
ForkvmProvisioner then live-migrates the source kernel's VM into a new VM (the source pauses
for a few milliseconds and runs on). The server owns the branch like any other kernel (it
lists, interrupts, restarts and shuts it down). Answers 201 with the new kernel's model, plus
a "forkvm" object (parent kernel id, how long the source was paused, how long the branch took).

Errors (JSON {"message": ...} like every Jupyter API):
    404  no kernel with that id in this server
    400  the kernel is not a forkvm kernel (only forkvm kernels have a VM to branch)
    409  the kernel is dead, or the forkvm daemon no longer runs it
    504  the branch did not finish within ForkvmBranchExtension.branch_timeout seconds
    502  the forkvm daemon refused or failed the branch (its message is passed on)

It is enabled by jupyter-config/jupyter_server_config.d/forkvm.json, which `pip install`
puts into {prefix}/etc/jupyter/jupyter_server_config.d/.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from jupyter_client.jsonutil import json_default
from jupyter_core.utils import ensure_async
from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_escape, url_path_join
from tornado import web

from kernelprovider.daemon_client import DaemonClient, DaemonError
from kernelprovider.provisioner import ForkvmProvisioner

# Seconds one branch may take, end to end (migration of the whole guest RAM under TCG on a
# busy host is the slow part). Configurable: --ServerApp.tornado_settings="{'forkvm_branch_timeout': 60}".
DEFAULT_BRANCH_TIMEOUT_S = 180.0
# Seconds the liveness check of the source kernel may take.
POLL_TIMEOUT_S = 15.0


def _error(status: int, message: str) -> web.HTTPError:
    # No %-args: APIHandler.write_error sends log_message as the JSON "message".
    return web.HTTPError(status, message)


class BranchHandler(APIHandler):
    auth_resource = "kernels"

    @property
    def branch_timeout(self) -> float:
        return float(self.settings.get("forkvm_branch_timeout", DEFAULT_BRANCH_TIMEOUT_S))

    @web.authenticated
    @authorized
    async def post(self, kernel_id: str) -> None:
        km = self.kernel_manager
        if kernel_id not in km:
            raise _error(404, f"no kernel {kernel_id!r} in this server")
        source = km.get_kernel(kernel_id)
        if not isinstance(getattr(source, "provisioner", None), ForkvmProvisioner):
            spec = getattr(source, "kernel_name", "?")
            raise _error(
                400,
                f"kernel {kernel_id} (kernelspec {spec!r}) is not a forkvm kernel; only kernels of a kernelspec "
                "using the forkvm provisioner can be branched",
            )
        await self._check_alive(kernel_id, source)

        new_id = str(uuid.uuid4())
        try:
            await asyncio.wait_for(self._start_branch(kernel_id, new_id, source.kernel_name), self.branch_timeout)
        except asyncio.TimeoutError:
            await self._discard(new_id)
            raise _error(504, f"branching kernel {kernel_id} did not finish within {self.branch_timeout:.0f} s")
        except DaemonError as exc:
            await self._discard(new_id)
            message = str(exc)
            status = 409 if ("is dead" in message or "no forkvm kernel" in message or "not running" in message) else 502
            raise _error(status, f"branching kernel {kernel_id} failed: {message}")
        model = dict(await ensure_async(km.kernel_model(new_id)))
        provisioner = km.get_kernel(new_id).provisioner
        model["forkvm"] = dict(getattr(provisioner, "launch_result", None) or {}, parent=kernel_id)
        self.set_header("Location", url_path_join(self.base_url, "api", "kernels", url_escape(new_id)))
        self.set_status(201)
        self.finish(json.dumps(model, default=json_default))

    async def _check_alive(self, kernel_id: str, source: Any) -> None:
        try:
            alive = await asyncio.wait_for(ensure_async(source.is_alive()), POLL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise _error(504, f"the forkvm daemon did not say within {POLL_TIMEOUT_S:.0f} s whether {kernel_id} runs")
        if not alive:
            raise _error(409, f"kernel {kernel_id} is dead; only a running kernel can be branched (restart it first)")
        try:
            info = await asyncio.wait_for(DaemonClient(autostart=False).call("poll", kernel_id=kernel_id), POLL_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise _error(504, f"the forkvm daemon did not say within {POLL_TIMEOUT_S:.0f} s whether {kernel_id} runs")
        except DaemonError as exc:
            raise _error(409, f"kernel {kernel_id} cannot be branched: {exc}")
        if info.get("status") is not None:
            raise _error(409, f"kernel {kernel_id} is dead (status {info['status']}); only a running kernel can be branched")

    async def _start_branch(self, source_id: str, new_id: str, kernel_name: str) -> None:
        km = self.kernel_manager
        await ensure_async(km.start_kernel(kernel_id=new_id, kernel_name=kernel_name, branch_from=source_id))
        kernel = km.get_kernel(new_id)
        # With pending kernels start_kernel returns before the kernel is up.
        ready = getattr(kernel, "ready", None)
        if ready is not None:
            await ready

    async def _discard(self, new_id: str) -> None:
        """Shut down what a failed or timed-out branch left behind, in the server and the daemon."""
        km = self.kernel_manager
        try:
            if new_id in km:
                await asyncio.wait_for(ensure_async(km.shutdown_kernel(new_id, now=True)), 30)
        except Exception as exc:  # noqa: BLE001 - best effort; the daemon release below is what frees the VM
            self.log.warning("forkvm: cleaning up branch %s in the server: %s", new_id, exc)
        try:
            await asyncio.wait_for(DaemonClient(autostart=False).call("release", kernel_id=new_id), 30)
        except (DaemonError, asyncio.TimeoutError):
            pass


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    base_url = web_app.settings["base_url"]
    pattern = url_path_join(base_url, r"api/forkvm/kernels/(?P<kernel_id>[^/]+)/branch")
    web_app.add_handlers(".*$", [(pattern, BranchHandler)])
    serverapp.log.info("forkvm: kernel branching at %s", url_path_join(base_url, "api/forkvm/kernels/<id>/branch"))


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "kernelprovider.server_extension"}]


# Older spelling, still read by some tools.
load_jupyter_server_extension = _load_jupyter_server_extension
