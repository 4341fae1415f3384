"""What of a 16550 goes into a snapshot: its registers (VERSION 1, JSON). Output is host-side."""

from __future__ import annotations

import json

from vmcore.devices.serial import Serial

VERSION = 1
_FIELDS = ("ier", "lcr", "mcr", "scr", "dll", "dlm", "fcr", "thre_pending")


def save(serial: Serial) -> bytes:
    return json.dumps({name: getattr(serial, name) for name in _FIELDS}).encode()


def restore(serial: Serial, data: bytes) -> None:
    values = json.loads(data)
    for name in _FIELDS:
        value = values[name]
        setattr(serial, name, bool(value) if name == "thre_pending" else int(value) & 0xFF)
