"""How to rebuild each kind of device in a fork: a factory and the persist module of its state.

A VM's device list is saved in its snapshot as DeviceSpecs; a fork calls build() for each, then
the persist module's restore() with the saved section.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

# kind -> (factory "module:function", persist module)
_KINDS = {
    "serial": ("vmcore.devices.serial:build", "vmcore.devices.serial_persist"),
    "virtio-vsock": (
        "vmcore.devices.virtio.vsock.device:build",
        "vmcore.devices.virtio.vsock.persist",
    ),
}


@dataclass(frozen=True)
class DeviceSpec:
    kind: str
    name: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "config": self.config}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> "DeviceSpec":
        if value.get("kind") not in _KINDS:
            raise ValueError(f"unknown device kind {value.get('kind')!r}")
        return cls(value["kind"], str(value["name"]), dict(value.get("config", {})))


def persist_of(kind: str) -> ModuleType:
    return importlib.import_module(_KINDS[kind][1])


def build(machine: Any, spec: DeviceSpec, **host: Any) -> object:
    """Create the device, attach it to `machine` (a MicroVm) and return it.

    `host` carries per-VM host resources that are not part of guest state (e.g. the vsock
    Unix socket path)."""
    module_name, function = _KINDS[spec.kind][0].split(":")
    device = getattr(importlib.import_module(module_name), function)(machine, spec, **host)
    machine.add_device(spec, device)
    return device
