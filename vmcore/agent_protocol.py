"""The framed protocol spoken between the host and the guest agent over one byte stream.

This file is the single specification of the protocol. The guest image builder copies it
verbatim into the guest agent package, so it must import nothing but the standard library.

A frame on the wire::

    magic   2 bytes  b"FK"
    type    1 byte   FrameType
    stream  4 bytes  big-endian stream id (0 for control frames)
    length  4 bytes  big-endian payload length, at most MAX_PAYLOAD
    crc     4 bytes  big-endian CRC-32 of type, stream, length and payload
    payload length bytes

The magic and CRC let a reader recover from garbage (random bytes, truncated frames, oversized
length fields): it reports an error and resynchronises on the next magic instead of dying.
Control payloads are JSON objects; DATA payloads are raw bytes that nobody decodes.
"""

from __future__ import annotations

import enum
import hmac
import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Iterator

MAGIC = b"FK"
HEADER = struct.Struct(">2sBIII")
MAX_PAYLOAD = 1 << 20
PROTOCOL_VERSION = 1

# Ports the kernel listens on inside the guest; the host maps its own ports onto them.
GUEST_KERNEL_PORTS = {"shell": 5555, "iopub": 5556, "stdin": 5557, "control": 5558, "hb": 5559}
# Stream ids at or above this are opened by the guest (CONNECT); below it, by the host (OPEN).
GUEST_STREAM_BASE = 1 << 31
# virtio-vsock port the agent listens on (vmcore transport).
AGENT_VSOCK_PORT = 1024
# Name of the virtio-serial port the agent opens (QEMU transport).
AGENT_SERIAL_PORT_NAME = "org.forkvm.agent.0"


class FrameType(enum.IntEnum):
    HELLO = 1  # guest -> host: agent started; {"version", "state"}
    READY = 2  # guest -> host: "warm kernel ready"; {"kernel_pid", "ports", "boot_to_ready_s"}
    RESUME = 3  # host -> guest: {"nonce", "key", "session", "time", "entropy"} (hex strings)
    RESUMED = 4  # guest -> host: confirmation of RESUME, see resume_proof()
    OPEN = 5  # host -> guest: open stream <stream> to {"port"} on the guest's loopback
    OPENED = 6  # guest -> host: stream connected
    DATA = 7  # both ways: raw bytes of a stream
    CLOSE = 8  # both ways: stream closed; {"reason"} optional
    SIGNAL = 9  # host -> guest: {"signum"} for the kernel process
    KERNEL_EXIT = 10  # guest -> host: {"status"} the kernel process's exit status
    ERROR = 11  # both ways: {"message"}; the sender keeps running
    PING = 12  # host -> guest: {"token"}
    PONG = 13  # guest -> host: {"token"}
    QUIESCE = 14  # host -> guest: close every stream, answer QUIESCED (before a snapshot)
    QUIESCED = 15  # guest -> host
    CONNECT = 16  # guest -> host: open stream <stream> to {"host", "port"} (egress allow-list only)


CONTROL_TYPES = frozenset(FrameType) - {FrameType.DATA}


class ProtocolError(Exception):
    """A frame that cannot be accepted; the reader has already skipped past it."""


@dataclass(frozen=True)
class Frame:
    type: FrameType
    stream: int
    payload: bytes

    def json(self) -> dict[str, Any]:
        """The payload of a control frame as a JSON object."""
        try:
            value = json.loads(self.payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProtocolError(f"{self.type.name} payload is not JSON: {exc}") from exc
        if not isinstance(value, dict):
            raise ProtocolError(f"{self.type.name} payload is not a JSON object")
        return value


def encode(ftype: FrameType, payload: bytes = b"", stream: int = 0) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    if not 0 <= stream < 1 << 32:
        raise ValueError(f"stream id {stream} out of range")
    body = struct.pack(">BII", ftype, stream, len(payload)) + payload
    return HEADER.pack(MAGIC, ftype, stream, len(payload), zlib.crc32(body)) + payload


def encode_json(ftype: FrameType, obj: dict[str, Any], stream: int = 0) -> bytes:
    return encode(ftype, json.dumps(obj, separators=(",", ":")).encode(), stream)


def encode_data(stream: int, data: bytes) -> Iterator[bytes]:
    """DATA frames for a chunk of any size."""
    view = memoryview(data)
    for start in range(0, len(view), MAX_PAYLOAD):
        yield encode(FrameType.DATA, bytes(view[start : start + MAX_PAYLOAD]), stream)


class FrameReader:
    """Incremental parser: feed() bytes, then iterate frames() until it is exhausted.

    frames() yields Frame objects, or ProtocolError instances for input it skipped, so the
    caller can answer garbage with an ERROR frame and keep going.
    """

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> None:
        self._buf += data

    def frames(self) -> Iterator[Frame | ProtocolError]:
        while True:
            item = self._next()
            if item is None:
                return
            yield item

    def partial(self) -> bool:
        """Whether the buffer starts with a frame that still waits for bytes.

        A corrupted length field (still under MAX_PAYLOAD) makes the reader wait for a payload
        that never comes, holding back every frame after it; a caller that sees a partial
        frame make no progress for a while calls drop_partial() to resynchronise.
        """
        return self._buf.startswith(MAGIC)

    def drop_partial(self) -> ProtocolError | None:
        """Give up on the incomplete frame at the head of the buffer; frames() then rescans."""
        if not self._buf.startswith(MAGIC):
            return None
        held = len(self._buf)
        del self._buf[:2]
        return ProtocolError(f"dropped an incomplete frame whose remaining bytes never came ({held} bytes held)")

    def _next(self) -> Frame | ProtocolError | None:
        buf = self._buf
        start = buf.find(MAGIC)
        if start != 0:
            if start < 0:
                # Keep a trailing b"F" that may begin the next magic.
                dropped = len(buf) - (1 if buf.endswith(MAGIC[:1]) else 0)
                if dropped == 0:
                    return None
                del buf[:dropped]
                return ProtocolError(f"skipped {dropped} bytes without a frame header")
            del buf[:start]
            return ProtocolError(f"skipped {start} bytes before a frame header")
        if len(buf) < HEADER.size:
            return None
        _, ftype, stream, length, crc = HEADER.unpack_from(buf)
        if length > MAX_PAYLOAD or ftype not in FrameType._value2member_map_:
            del buf[:2]
            return ProtocolError(f"bad frame header (type {ftype}, length {length})")
        end = HEADER.size + length
        if len(buf) < end:
            return None
        payload = bytes(buf[HEADER.size : end])
        if zlib.crc32(struct.pack(">BII", ftype, stream, length) + payload) != crc:
            del buf[:2]
            return ProtocolError(f"CRC mismatch on a {length}-byte frame")
        del buf[:end]
        return Frame(FrameType(ftype), stream, payload)


def resume_proof(key: bytes, nonce: bytes) -> str:
    """What the guest returns to show it installed `key` for this particular RESUME."""
    return hmac.new(key, b"forkvm-resume:" + nonce, "sha256").hexdigest()
