"""What a restarting kernel may ask to keep: the HMAC key and the host ports its clients hold.

A local kernel restarts on the same ports with the same key, so every client connected before
the restart carries on; a forkvm restart does the same. Both values come from a client of the
daemon socket, so they are checked here before anything uses them.
"""

from __future__ import annotations

import re

from vmcore.agent_protocol import GUEST_KERNEL_PORTS

PORT_NAMES = frozenset(f"{channel}_port" for channel in GUEST_KERNEL_PORTS)
# Keys jupyter_client makes are uuid4 strings; forkvm makes 64 hex digits.
KEY_PATTERN = re.compile(r"[A-Za-z0-9-]{16,128}")


def requested_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not KEY_PATTERN.fullmatch(value):
        raise ValueError("key must be 16 to 128 letters, digits or dashes")
    return value


def requested_ports(value: object) -> dict[str, int] | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != PORT_NAMES:
        raise ValueError(f"ports must name exactly {', '.join(sorted(PORT_NAMES))}")
    ports = {}
    for name, port in value.items():
        if not isinstance(port, int) or isinstance(port, bool) or not 1024 <= port <= 65535:
            raise ValueError(f"{name} must be a port number from 1024 to 65535")
        ports[name] = port
    if len(set(ports.values())) != len(ports):
        raise ValueError("ports must be five different numbers")
    return ports
