"""Named QEMU templates on disk: guest RAM file, device state file and metadata.

    <root>/<name>/memory.img     guest RAM (forks map it copy-on-write; never written after save)
    <root>/<name>/state.bin      CPU and device state from QEMU migration, RAM excluded
    <root>/<name>/template.json  what the template was built from, see TemplateRecord

A build happens in a sibling directory and is renamed into place, so a template is either
complete or absent. Running forks keep their mappings if a template is replaced or removed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from vmcore.engine import TemplateInfo
from vmcore.errors import EngineError

FORMAT_VERSION = 1
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class TemplateRecord:
    name: str
    version: int
    format: int
    memory_mib: int
    accel: str
    kernel: str
    initramfs: str
    cmdline: str
    image_hash: str
    qemu_version: str
    created: float
    boot_to_ready_s: float


def check_name(name: str) -> str:
    if not NAME_PATTERN.match(name):
        raise EngineError(f"invalid template name {name!r}: use letters, digits, '.', '_', '-' (max 64)")
    return name


def _builder_alive(staging_name: str) -> bool:
    """Whether the process named in `.building-<name>-<pid>-<ns>` still runs."""
    parts = staging_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return True  # a build of this very process (an engine made while another builds)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory(self, name: str) -> Path:
        return self.root / check_name(name)

    def staging_directory(self, name: str) -> Path:
        # The builder's pid is part of the name: another process's clean_stale_builds() must
        # leave a build that is still in progress alone.
        staging = self.root / f".building-{check_name(name)}-{os.getpid()}-{time.time_ns()}"
        staging.mkdir(parents=True)
        return staging

    def load(self, name: str) -> TemplateRecord:
        path = self.directory(name) / "template.json"
        try:
            data = json.loads(path.read_text())
            record = TemplateRecord(**data)
        except FileNotFoundError:
            raise EngineError(f"no template named {name!r}; build it with `forkvm template build {name}`") from None
        except (ValueError, TypeError) as exc:
            raise EngineError(f"template {name!r} is damaged ({exc}); rebuild it") from exc
        if record.format != FORMAT_VERSION:
            raise EngineError(f"template {name!r} has format {record.format}, expected {FORMAT_VERSION}; rebuild it")
        return record

    def commit(self, staging: Path, record: TemplateRecord) -> None:
        (staging / "template.json").write_text(json.dumps(asdict(record), indent=2))
        final = self.directory(record.name)
        if final.exists():
            retired = self.root / f".retired-{record.name}-{time.time_ns()}"
            final.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)
        staging.rename(final)

    def next_version(self, name: str) -> int:
        try:
            return self.load(name).version + 1
        except EngineError:
            return 1

    def remove(self, name: str) -> None:
        directory = self.directory(name)
        if not directory.exists():
            raise EngineError(f"no template named {name!r}")
        shutil.rmtree(directory)

    def clean_stale_builds(self) -> None:
        """Remove what an interrupted build or replacement left behind.

        Several processes (daemons of other runtime directories, tests) share one store, so a
        staging directory is removed only when the process that made it is gone.
        """
        if self.root.exists():
            for leftover in self.root.glob(".building-*"):
                if not _builder_alive(leftover.name):
                    shutil.rmtree(leftover, ignore_errors=True)
            for leftover in self.root.glob(".retired-*"):
                shutil.rmtree(leftover, ignore_errors=True)

    def list(self) -> list[TemplateInfo]:
        infos = []
        if not self.root.exists():
            return infos
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(".") or not (directory / "template.json").exists():
                continue
            try:
                record = self.load(directory.name)
            except EngineError:
                continue
            size = sum(f.stat().st_blocks * 512 for f in directory.iterdir() if f.is_file())
            infos.append(
                TemplateInfo(
                    name=record.name,
                    backend="qemu",
                    memory_mib=record.memory_mib,
                    image_hash=record.image_hash,
                    backend_version=record.qemu_version,
                    created=record.created,
                    path=directory,
                    size_bytes=size,
                )
            )
        return infos
