"""The jupyter_client kernel provisioner: each lifecycle call is one forkvm daemon request."""

from __future__ import annotations

import logging
import signal
from typing import Any

from jupyter_client.connect import KernelConnectionInfo
from jupyter_client.provisioning.provisioner_base import KernelProvisionerBase
from traitlets import Bool, Int, Unicode

from kernelprovider.daemon_client import DaemonClient, DaemonError

log = logging.getLogger(__name__)


class ForkvmProvisioner(KernelProvisionerBase):  # type: ignore[misc]
    """Kernels that are copy-on-write forks of a VM template holding a warm IPython kernel."""

    template = Unicode("default", help="Template the kernel is forked from").tag(config=True)
    pool_size = Int(
        None, allow_none=True, help="Forks the daemon keeps ready for this template (default: ForkvmDaemon.pool_size)"
    ).tag(config=True)
    auto_build_template = Bool(True, help="Build the template on first use when it is missing").tag(config=True)
    branch_from = Unicode("", help="Kernel id to branch from instead of forking the template").tag(config=True)

    _launched: bool = False
    _status: int | None = None
    # Set by cleanup(restart=True): the key and ports the next launch asks to keep, so clients
    # connected before a restart carry on (as with a local kernel).
    _restart_identity: dict[str, Any] | None = None
    _branched: bool = False  # this kernel was created by a branch (restarts fork the template)
    # What the daemon said about the last launch (vm_id, launch_s, and for a branch parent, source_pause_s).
    launch_result: dict[str, Any] | None = None

    @property
    def has_process(self) -> bool:
        return self._launched

    @property
    def _daemon(self) -> DaemonClient:
        # Only a launch starts a daemon: one that is gone took its kernels with it, and asking
        # a new one about them would just start VMs to say "dead".
        return DaemonClient(autostart=not self._launched)

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        kwargs = await super().pre_launch(**kwargs)
        # The kernelspec's argv is never run: the kernel already runs inside the template.
        kwargs["cmd"] = list(self.kernel_spec.argv)
        requested = str(kwargs.pop("branch_from", "") or "")
        if self._branched:
            # A restart (jupyter_client passes the first launch's arguments again): a restarted
            # kernel is a fresh one from the template, not a second branch of the source's
            # current state, and it must not depend on the source still running.
            self.branch_from = ""
        else:
            self.branch_from = requested or self.branch_from
        return kwargs

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> KernelConnectionInfo:
        request: dict[str, Any] = {"kernel_id": self.kernel_id}
        if self.branch_from:
            result = await self._daemon.call("branch", kernel_id=self.branch_from, new_kernel_id=self.kernel_id)
            self._branched = True
            self.template = str(result.get("template") or self.template)
        else:
            request.update(template=self.template, **(self._restart_identity or {}))
            if self.pool_size is not None:
                request["pool_size"] = self.pool_size
            result = await self._launch_from_template(request)
        self._restart_identity = None
        info = dict(result["connection_info"])
        info["key"] = info["key"].encode()
        self.connection_info = info
        self.launch_result = {
            key: result.get(key) for key in ("vm_id", "backend", "template", "launch_s", "parent", "source_pause_s")
        }
        self._launched = True
        self._status = None
        self.log.info("forkvm kernel %s on %s (vm %s) in %.3f s", self.kernel_id, result["backend"], result["vm_id"], result["launch_s"])
        return self.connection_info

    async def _launch_from_template(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._daemon.call("launch", **request)
        except DaemonError as exc:
            if not (self.auto_build_template and "no template named" in str(exc)):
                raise
        self.log.warning("forkvm template %r is missing; building it now (once; a few minutes)", self.template)
        await self._daemon.call(
            "template_build", name=self.template, progress=lambda stage, _: self.log.info("template: %s", stage)
        )
        return await self._daemon.call("launch", **request)

    async def poll(self) -> int | None:
        if not self._launched:
            return self._status
        try:
            status = (await self._daemon.call("poll", kernel_id=self.kernel_id))["status"]
        except DaemonError:
            status = -9  # the daemon forgot it or is gone: either way the kernel is dead
        if status is not None:
            self._status = status
        return status

    async def wait(self) -> int | None:
        if not self._launched:
            return self._status
        try:
            self._status = (await self._daemon.call("wait", kernel_id=self.kernel_id))["status"]
        except DaemonError:
            self._status = -9
        return self._status

    async def send_signal(self, signum: int) -> None:
        if self._launched:
            try:
                await self._daemon.call("signal", kernel_id=self.kernel_id, signum=int(signum))
            except DaemonError:
                # Signalling a kernel that already died is a no-op (as for a local process that
                # exited): shutting down a kernel whose VM is gone must not fail.
                if await self.poll() is None:
                    raise

    async def kill(self, restart: bool = False) -> None:
        if self._launched:
            try:
                await self._daemon.call("kill", kernel_id=self.kernel_id)
            except DaemonError:
                if await self.poll() is None:
                    raise

    async def terminate(self, restart: bool = False) -> None:
        if self._launched:
            try:
                await self._daemon.call("signal", kernel_id=self.kernel_id, signum=int(signal.SIGTERM))
            except DaemonError as exc:
                self.log.debug("terminate: %s", exc)

    async def cleanup(self, restart: bool = False) -> None:
        if self._launched:
            if restart:
                key = self.connection_info["key"]
                self._restart_identity = {
                    "key": key.decode() if isinstance(key, bytes) else key,
                    "ports": {name: port for name, port in self.connection_info.items() if name.endswith("_port")},
                }
            try:
                self._status = (await self._daemon.call("release", kernel_id=self.kernel_id))["status"]
            except DaemonError as exc:
                self.log.debug("cleanup: %s", exc)
            self._launched = False

    async def get_provisioner_info(self) -> dict[str, Any]:
        info = await super().get_provisioner_info()
        connection = dict(info.get("connection_info") or {})
        if isinstance(connection.get("key"), bytes):
            connection["key"] = connection["key"].decode()
        info.update(connection_info=connection, forkvm_template=self.template, forkvm_launched=self._launched)
        return info

    async def load_provisioner_info(self, provisioner_info: dict[str, Any]) -> None:
        await super().load_provisioner_info(provisioner_info)
        self.template = provisioner_info.get("forkvm_template", self.template)
        self._launched = bool(provisioner_info.get("forkvm_launched", True))
        key = self.connection_info.get("key")
        if isinstance(key, str):
            self.connection_info = {**self.connection_info, "key": key.encode()}
