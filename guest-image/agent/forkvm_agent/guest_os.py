"""What the agent does to the guest operating system on resume: entropy and wall clock."""

from __future__ import annotations

import array
import fcntl
import hashlib
import os
import struct
import time

# From <linux/random.h>: _IOW('R', 0x03, int[2]) and _IO('R', 0x07).
RNDADDENTROPY = 0x40085203
RNDRESEEDCRNG = 0x5207


def reseed_kernel_crng(entropy: bytes) -> None:
    """Mix host entropy into the CRNG and force a reseed, so this fork's stream is its own.

    RNDADDENTROPY alone leaves an already-initialised CRNG on its old key until the next
    scheduled reseed; RNDRESEEDCRNG re-keys it at once.
    """
    words = array.array("I", entropy + b"\0" * (-len(entropy) % 4))
    info = struct.pack("ii", len(entropy) * 8, len(entropy)) + words.tobytes()
    with open("/dev/urandom", "wb", buffering=0) as urandom:
        fcntl.ioctl(urandom.fileno(), RNDADDENTROPY, info)
        fcntl.ioctl(urandom.fileno(), RNDRESEEDCRNG)


def set_wall_clock(epoch_seconds: float) -> None:
    time.clock_settime(time.CLOCK_REALTIME, epoch_seconds)


def urandom_digest() -> str:
    """A digest of fresh kernel randomness: differs between forks once the CRNG is re-keyed."""
    return hashlib.sha256(os.urandom(32)).hexdigest()[:32]
