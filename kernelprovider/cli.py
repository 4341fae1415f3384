"""The `forkvm` command line."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from kernelprovider import paths
from kernelprovider.daemon_client import DaemonError, call_sync, daemon_running, start_daemon_process

console = Console(stderr=True)


def _call(method: str, autostart: bool = True, **params: Any) -> Any:
    try:
        return call_sync(method, autostart=autostart, **params)
    except DaemonError as exc:
        raise click.ClickException(str(exc)) from exc


def _call_with_progress(method: str, title: str, **params: Any) -> Any:
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
        console=console,
    ) as bar:  # fmt: skip
        task = bar.add_task(title, total=1.0)

        def update(stage: str, fraction: float | None) -> None:
            bar.update(task, description=stage[:70], **({"completed": fraction} if fraction is not None else {}))

        try:
            return call_sync(method, progress=update, **params)
        except DaemonError as exc:
            raise click.ClickException(str(exc)) from exc


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@click.group()
def main() -> None:
    """forkvm: Jupyter kernels that are copy-on-write forks of a warm VM."""


@main.command()
def doctor() -> None:
    """Say which backend this host gets, and why."""
    from vmcore.host_kvm import kvm_status

    from kernelprovider.backend_choice import choose_backend

    status = kvm_status()
    choice = choose_backend("auto")
    click.echo(f"/dev/kvm:     {'usable' if status.device else 'missing or not accessible'}")
    click.echo(f"KVM module:   {status.module or 'none'}")
    click.echo(f"KVM kind:     {'hardware (VT-x/AMD-V)' if status.hardware_kvm else 'software or none'}")
    click.echo(f"backend:      {choice.backend}")
    click.echo(f"why:          {choice.reason}")
    click.echo(f"daemon:       {'running' if daemon_running(paths.daemon_socket()) else 'not running'} ({paths.daemon_socket()})")
    click.echo(f"cache:        {paths.cache_dir()}")


@main.group()
def template() -> None:
    """Build, list and remove VM templates."""


@template.command("build")
@click.argument("name", default="default")
@click.option("--memory", "memory_mib", type=click.IntRange(256, 65536), default=None, help="Guest RAM in MiB")
@click.option("--force", is_flag=True, help="Rebuild even when the template is up to date")
@click.option(
    "--allow-egress", "egress", multiple=True, metavar="IP:PORT",
    help="Let kernels of this template connect to IP:PORT (repeatable); default: no network at all",
)  # fmt: skip
def template_build(name: str, memory_mib: int | None, force: bool, egress: tuple[str, ...]) -> None:
    """Build template NAME: guest image, boot, warm kernel, snapshot."""
    from vmcore.errors import EngineError
    from vmcore.qemu.template_store import check_name

    try:
        check_name(name)
    except EngineError as exc:
        raise click.ClickException(str(exc)) from exc
    started = time.monotonic()
    result = _call_with_progress(
        "template_build", f"template {name}", name=name, memory_mib=memory_mib, force=force, egress=list(egress)
    )
    state = "up to date" if result["up_to_date"] else f"built in {time.monotonic() - started:.1f} s"
    egress_note = f", egress to {', '.join(result['egress'])}" if result["egress"] else ", no network"
    click.echo(f"template {result['name']} ({result['backend']}, {result['memory_mib']} MiB guest RAM, "
               f"{_size(result['size_bytes'])} on disk{egress_note}): {state}")  # fmt: skip


@template.command("list")
def template_list() -> None:
    """List templates."""
    table = Table("name", "backend", "memory", "on disk", "created", "image")
    for t in _call("template_list"):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["created"]))
        table.add_row(t["name"], t["backend"], f"{t['memory_mib']} MiB", _size(t["size_bytes"]), created, t["image_hash"][:12])
    Console().print(table)


@template.command("rm")
@click.argument("name")
def template_rm(name: str) -> None:
    """Remove template NAME (running kernels keep working)."""
    _call("template_rm", name=name)
    click.echo(f"removed template {name}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output")
def ps(as_json: bool) -> None:
    """List kernels with backend, age and memory."""
    kernels = _call("list", autostart=False) if daemon_running(paths.daemon_socket()) else []
    if as_json:
        click.echo(json.dumps(kernels, indent=2))
        return
    table = Table("kernel", "vm", "backend", "template", "age", "private memory", "status")
    for column in table.columns[:2]:
        column.overflow = "fold"  # ids must stay whole: they are what `forkvm kill` takes
    for k in kernels:
        status = "running" if k["status"] is None else f"exited {k['status']}"
        if k.get("end_reason"):
            status += f" ({k['end_reason']})"
        table.add_row(k["kernel_id"], k["vm_id"], k["backend"], k["template"], f"{k['age_s']:.0f} s",
                      _size(k["private_memory_bytes"]), status)  # fmt: skip
    Console().print(table)


@main.command()
@click.argument("kernel_id")
def kill(kernel_id: str) -> None:
    """Kill kernel KERNEL_ID's VM."""
    _call("kill", autostart=False, kernel_id=kernel_id)
    click.echo(f"killed {kernel_id}")


def _kernel_id_for(kernel: str) -> str:
    """KERNEL is a kernel id, or a connection file whose ports identify a forkvm kernel."""
    if not kernel.endswith(".json"):
        return kernel
    from jupyter_client.connect import find_connection_file

    try:
        connection = json.loads(open(find_connection_file(kernel)).read())
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot read connection file {kernel}: {exc}") from exc
    for k in _call("list", autostart=False):
        if k["ports"].get("shell_port") == connection.get("shell_port"):
            return str(k["kernel_id"])
    raise click.ClickException(f"{kernel} is not the connection file of a forkvm kernel this daemon runs")


def _existing_file_is_not_a_connection_file(kernel: str) -> None:
    if os.path.isfile(kernel) and not kernel.endswith(".json"):
        raise click.ClickException(f"{kernel} is not a connection file (expected a kernel id or a kernel-*.json file)")


@main.command()
@click.argument("kernel")
def branch(kernel: str) -> None:
    """Branch running KERNEL (id or connection file) into a new kernel with the same state.

    Prints the new kernel's connection file, e.g. for `jupyter console --existing FILE`.
    """
    from jupyter_core.paths import jupyter_runtime_dir

    _existing_file_is_not_a_connection_file(kernel)
    os.makedirs(jupyter_runtime_dir(), exist_ok=True)
    # The daemon writes the file, and removes it when the kernel is released or forgotten.
    result = _call(
        "branch", autostart=False, kernel_id=_kernel_id_for(kernel), connection_dir=os.path.abspath(jupyter_runtime_dir())
    )
    console.print(
        f"[dim]branched {result['parent']} -> {result['kernel_id']} in {result['launch_s']:.2f} s "
        f"(source paused {result['source_pause_s'] or 0:.3f} s)[/dim]"
    )
    click.echo(result["connection_file"])


@main.command()
@click.argument("code", default="import numpy; print('forkvm says', numpy.arange(10).sum())")
@click.option("--timeout", default=120.0, help="Seconds to wait for the cell")
def run(code: str, timeout: float) -> None:
    """Start a forkvm kernel through jupyter_client, run CODE in it, print its output."""
    from jupyter_client.manager import start_new_kernel

    started = time.monotonic()
    manager, client = start_new_kernel(kernel_name="forkvm", startup_timeout=timeout)
    ready = time.monotonic() - started
    try:
        reply = client.execute_interactive(code, timeout=timeout)
    except TimeoutError:
        raise click.ClickException(f"the cell did not finish within {timeout:g} s (--timeout)") from None
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=False)
    console.print(f"[dim]kernel ready in {ready:.3f} s; cell status: {reply['content']['status']}[/dim]")
    if reply["content"]["status"] != "ok":
        sys.exit(1)


@main.group()
def daemon() -> None:
    """Start, stop and inspect the forkvm daemon."""


@daemon.command("start")
def daemon_start() -> None:
    """Start the daemon in the background (it also starts on first use)."""
    socket_path = paths.daemon_socket()
    if daemon_running(socket_path):
        click.echo(f"forkvm daemon already running ({socket_path})")
        return
    try:
        pid = start_daemon_process(socket_path)
    except DaemonError as exc:
        raise click.ClickException(str(exc)) from exc
    if pid < 0:  # another start won the race
        click.echo(f"forkvm daemon already running ({socket_path})")
        return
    click.echo(f"forkvm daemon started, pid {pid}, log {paths.daemon_log()}")


@daemon.command("stop")
def daemon_stop() -> None:
    """Stop the daemon and every kernel it runs."""
    socket_path = paths.daemon_socket()
    if not daemon_running(socket_path):
        click.echo("forkvm daemon is not running")
        return
    pid_file = paths.daemon_pid_file()
    pid = int(pid_file.read_text()) if pid_file.exists() else None
    _call("stop", autostart=False)
    deadline = time.monotonic() + 30
    while pid is not None and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
    click.echo("forkvm daemon stopped")


@daemon.command("status")
def daemon_status() -> None:
    """Show the daemon's backend, kernels and pools."""
    if not daemon_running(paths.daemon_socket()):
        click.echo(f"forkvm daemon is not running (socket {paths.daemon_socket()})")
        sys.exit(3)
    click.echo(json.dumps(_call("status", autostart=False), indent=2))


@daemon.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("traitlets_options", nargs=-1, type=click.UNPROCESSED)
def daemon_run(traitlets_options: tuple[str, ...]) -> None:
    """Run the daemon in the foreground (options: --ForkvmDaemon.pool_size=N ...)."""
    from kernelprovider.daemon import run_daemon

    run_daemon(list(traitlets_options))


if __name__ == "__main__":
    main()
