"""Per-template policy the daemon applies to every kernel forked from a template.

Kept beside, not inside, the engine's template files: it is the daemon's decision what a
kernel may reach, not a property of the saved VM. Default: no egress at all.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass

from kernelprovider import paths


@dataclass(frozen=True)
class TemplatePolicy:
    egress: tuple[tuple[str, int], ...] = ()


def parse_egress(items: list[str]) -> tuple[tuple[str, int], ...]:
    """["127.0.0.1:8888", ...] -> ((host, port), ...); IP literals only, since guests have no DNS."""
    pairs = []
    for item in items:
        host, sep, port = str(item).rpartition(":")
        try:
            address = str(ipaddress.ip_address(host.strip("[]")))
            number = int(port)
        except ValueError:
            raise ValueError(f"egress entry {item!r} is not IP:PORT") from None
        if not sep or not 0 < number < 65536:
            raise ValueError(f"egress entry {item!r} is not IP:PORT")
        pairs.append((address, number))
    return tuple(sorted(set(pairs)))


def _path(backend: str, name: str):
    return paths.cache_dir() / "policies" / backend / f"{name}.json"


def load_policy(backend: str, name: str) -> TemplatePolicy:
    try:
        data = json.loads(_path(backend, name).read_text())
    except FileNotFoundError:
        return TemplatePolicy()
    return TemplatePolicy(egress=tuple((str(h), int(p)) for h, p in data.get("egress", [])))


def save_policy(backend: str, name: str, policy: TemplatePolicy) -> None:
    path = _path(backend, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"egress": [list(pair) for pair in policy.egress]}))


def remove_policy(backend: str, name: str) -> None:
    _path(backend, name).unlink(missing_ok=True)
