"""The guest image and its agent, end to end under QEMU (TCG on hosts without hardware KVM).

* the image boots and the agent reports "warm kernel ready" (boot_to_ready_s, goal < 60 s);
* every resume makes the guest unique: kernel CRNG, Python and numpy generators, uuid4, clock,
  HMAC key (a message signed with the template's key is ignored after the resume);
* garbage on the host channel gets ERROR frames, never a dead agent or kernel.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

from kernelprovider import paths
from tests import vm_helpers as vh
from vmcore.agent_protocol import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    Frame,
    FrameReader,
    FrameType,
    ProtocolError,
    encode,
    encode_json,
)
from vmcore.engine import ResumeParams
from vmcore.errors import GuestError
from vmcore.guest_link import GuestLink
from vmcore.qemu.engine import QemuEngine, QemuMachine
from vmcore.qemu.process import QemuConfig, QemuProcess

# The goal for boot-to-ready on these machines. It is printed and recorded, not asserted:
# a timing goal is a benchmark figure, and it depends on how loaded the host is.
BOOT_GOAL_S = 60.0
CLOCK_TOLERANCE_S = 2.0


# --- boot ------------------------------------------------------------------------------------
def _record_boot_time(artifacts_dir: Path, what: str, seconds: float) -> None:
    verdict = "meets" if seconds < BOOT_GOAL_S else "misses"
    line = f"{what}: guest boot to warm kernel ready {seconds:.1f} s ({verdict} the {BOOT_GOAL_S:.0f} s goal)"
    print(line)
    with open(artifacts_dir / "boot_to_ready.txt", "a") as f:
        f.write(line + "\n")


@pytest.mark.slow
def test_template_records_boot_to_ready(forkvm_template: str, artifacts_dir: Path) -> None:
    record = json.loads((paths.template_root("qemu") / forkvm_template / "template.json").read_text())
    boot_to_ready = record["boot_to_ready_s"]
    _record_boot_time(artifacts_dir, f"template {forkvm_template} ({record['accel']})", boot_to_ready)
    assert boot_to_ready > 0


@pytest.mark.slow
def test_image_boots_and_agent_reports_warm_kernel_ready(
    loop: vh.LoopThread, tmp_path: Path, engine: QemuEngine, artifacts_dir: Path
) -> None:
    """A fresh boot of the image (not a restore): READY arrives and the console says so."""
    import forkvm_image

    image = forkvm_image.build_image(lambda stage, fraction: None)  # a cache hit after the template build
    config = QemuConfig(
        memory_mib=1024,
        memory_file=tmp_path / "memory.img",
        accel=engine.accel,
        kernel=image.kernel,
        initramfs=image.initramfs,
        cmdline=engine.kernel_cmdline(image.cmdline),  # as a template build boots it
        share=True,
    )

    async def boot() -> tuple[dict, str, float, list[str]]:
        started = time.monotonic()
        process = await QemuProcess.spawn("agent boot test", config)
        try:
            reader, writer = await asyncio.open_connection(sock=process.agent_socket)
            link = GuestLink(reader, writer, "agent boot test")
            link.start()
            ready = await asyncio.wait_for(link.wait_ready(), 300)
            host_s = time.monotonic() - started
            await asyncio.wait_for(link.ping(), 30)
            # the console line comes from the same print as READY; give the console a moment
            for _ in range(50):
                if "warm kernel ready" in process.console_tail(20000):
                    break
                await asyncio.sleep(0.1)
            console = process.console_tail(20000)
            errors = list(link.guest_errors)
            await link.close()
            return ready, console, host_s, errors
        finally:
            await process.kill()

    ready, console, host_s, errors = loop.run(boot())
    print(f"fresh boot ({engine.describe()}): boot_to_ready_s {ready['boot_to_ready_s']:.1f} (guest uptime), "
          f"{host_s:.1f} s measured on the host")  # fmt: skip
    assert "forkvm-agent: warm kernel ready" in console
    assert ready["kernel_pid"] > 1
    assert ready["implementation"] == "ipython"
    assert set(ready["ports"]) == {"shell", "iopub", "stdin", "control", "hb"}
    _record_boot_time(artifacts_dir, f"fresh boot ({engine.accel}), host {host_s:.1f} s", ready["boot_to_ready_s"])
    assert ready["boot_to_ready_s"] > 0
    assert not errors


@pytest.mark.slow
def test_kernel_info_through_the_agent(loop: vh.LoopThread, engine: QemuEngine, forkvm_template: str) -> None:
    fork = vh.fork(loop, engine, forkvm_template)
    try:
        reply = vh.kernel_info(fork.client)
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["implementation"] == "ipython"
        assert reply["header"]["session"] == fork.params.session
        assert fork.machine.confirmation is not None
    finally:
        vh.release(loop, fork)


# --- uniqueness after resume ------------------------------------------------------------------
UNIQUE_VALUES = "(os.urandom(16).hex(), random.random(), float(numpy.random.random()), str(uuid.uuid4()))"


@pytest.mark.slow
def test_two_resumes_are_unique_with_clock_and_new_key(
    loop: vh.LoopThread, engine: QemuEngine, forkvm_template: str
) -> None:
    first_params = ResumeParams()
    second_params = ResumeParams()
    assert first_params.key != second_params.key and first_params.entropy != second_params.entropy
    forks = []
    try:
        for params in (first_params, second_params):
            forks.append(vh.fork(loop, engine, forkvm_template, params))
        values = []
        for fork in forks:
            values.append(vh.evaluate(fork.client, "import os, random, uuid, numpy", UNIQUE_VALUES))
        print("per-fork values:", values)
        for index, name in enumerate(("os.urandom(16)", "random.random()", "numpy.random.random()", "uuid.uuid4()")):
            assert values[0][index] != values[1][index], f"{name} is the same in two forks"
        assert forks[0].machine.confirmation.urandom_digest != forks[1].machine.confirmation.urandom_digest

        for fork in forks:
            before = time.time()
            guest = vh.evaluate(fork.client, "import time", "time.time()")
            after = time.time()
            print(f"guest clock {guest:.3f}, host window [{before:.3f}, {after:.3f}]")
            assert before - CLOCK_TOLERANCE_S <= guest <= after + CLOCK_TOLERANCE_S

        # The template's key is still in the guest's connection file (it is never rewritten).
        fork = forks[0]
        template_key = json.loads(vh.evaluate(fork.client, "", "open('/run/forkvm/kernel.json').read()"))["key"]
        assert template_key.encode() != fork.params.key
        stale = vh.make_client(fork.ports, template_key.encode())
        fork.extra_clients.append(stale)
        stale.kernel_info()
        with pytest.raises(queue.Empty):  # the kernel drops the badly signed request
            stale.get_shell_msg(timeout=5)
        good = vh.make_client(fork.ports, fork.params.key)
        fork.extra_clients.append(good)
        assert vh.kernel_info(good)["content"]["status"] == "ok"
        with pytest.raises(queue.Empty):
            stale.get_shell_msg(timeout=1)
    finally:
        for fork in forks:
            vh.release(loop, fork)


# --- garbage on the host channel --------------------------------------------------------------
def test_frame_reader_resynchronises_after_garbage_and_stalled_frames() -> None:
    """The parser alone (no VM): every garbage case yields errors, never swallows what follows
    for good; a frame stalled on a corrupted length is dropped on request (drop_partial)."""
    ping = encode_json(FrameType.PING, {"token": 9})
    for name, garbage in _garbage_cases():
        reader = FrameReader()
        reader.feed(garbage + ping)
        items = list(reader.frames())
        while not any(isinstance(i, Frame) and i.type is FrameType.PING and i.payload == b'{"token":9}' for i in items):
            assert reader.partial(), f"{name}: the PING after the garbage is lost"
            dropped = reader.drop_partial()
            assert isinstance(dropped, ProtocolError)
            items += [dropped, *reader.frames()]
        assert not reader.partial() and reader.drop_partial() is None


def _frame(ftype: int, payload: bytes, stream: int = 0, length: int | None = None) -> bytes:
    """A frame with a valid CRC, whatever its type or declared length."""
    length = len(payload) if length is None else length
    body = struct.pack(">BII", ftype, stream, length) + payload
    return HEADER.pack(MAGIC, ftype, stream, length, zlib.crc32(body)) + payload


def _garbage_cases() -> list[tuple[str, bytes]]:
    rng = random.Random(20240611)
    ping = encode_json(FrameType.PING, {"token": 1})
    cases = [
        ("random bytes", bytes(rng.getrandbits(8) for _ in range(8192))),
        ("random bytes containing the magic", b"FK" + bytes(rng.getrandbits(8) for _ in range(100)) + b"FKFKF"),
        # (no complete PING inside garbage: its PONG would answer the test's own PING early)
        ("truncated frame followed by a frame", ping[: len(ping) // 2] + encode(FrameType.DATA, b"z", stream=31337)),
        ("truncated header", ping[:7]),
        ("truncated frame with nothing after it", _frame(FrameType.DATA, b"x" * 1000, stream=1)[:40]),
        ("length field corrupted to 50 kB", _frame(FrameType.OPEN, b'{"port": 5555}', stream=9, length=50_000)),
        ("oversized length field", _frame(FrameType.DATA, b"x" * 16, stream=1, length=0xFFFFFFFF)),
        ("length just over the limit", _frame(FrameType.DATA, b"", stream=1, length=MAX_PAYLOAD + 1)),
        ("unknown frame type", _frame(200, b"{}")),
        ("frame type zero", _frame(0, b"{}")),
        ("guest-only frame type from the host", encode_json(FrameType.READY, {})),
        ("RESUMED from the host", encode_json(FrameType.RESUMED, {"nonce": "00"})),
        ("bad JSON in OPEN", encode(FrameType.OPEN, b"{not json", stream=77)),
        ("JSON array in PING", encode(FrameType.PING, b"[1, 2]")),
        ("invalid UTF-8 in SIGNAL", encode(FrameType.SIGNAL, b"\xff\xfe{")),
        ("SIGNAL without signum", encode_json(FrameType.SIGNAL, {})),
        ("SIGNAL with a signal the agent refuses", encode_json(FrameType.SIGNAL, {"signum": 31})),
        ("SIGNAL with a non-number", encode_json(FrameType.SIGNAL, {"signum": "nine"})),
        ("RESUME with bad JSON", encode(FrameType.RESUME, b'{"key": ')),
        ("RESUME missing fields", encode_json(FrameType.RESUME, {"nonce": "00"})),
        ("RESUME with too little entropy", encode_json(
            FrameType.RESUME, {"nonce": "00", "key": "00", "session": "s", "entropy": "00", "time": 1.0})),
        ("OPEN to a port that is not a kernel port", encode_json(FrameType.OPEN, {"port": 22}, stream=991)),
        ("OPEN on stream 0", encode_json(FrameType.OPEN, {"port": 5555}, stream=0)),
        ("DATA for an unknown stream", encode(FrameType.DATA, b"hello", stream=123456)),
        ("large DATA for an unknown stream", encode(FrameType.DATA, os.urandom(MAX_PAYLOAD), stream=7777)),
        ("CLOSE for an unknown stream", encode(FrameType.CLOSE, b"", stream=424242)),
        ("CRC mismatch", bytearray(encode_json(FrameType.PING, {"token": 3}))[:-1] + b"X"),
    ]
    # Mutated valid frames: one changed byte always breaks the CRC (or the magic), so none of
    # these can turn into a real request such as SIGNAL or QUIESCE.
    templates = [
        encode_json(FrameType.PING, {"token": 4}),
        encode_json(FrameType.OPEN, {"port": 5555}, stream=5000),
        encode(FrameType.DATA, b"abc" * 50, stream=5001),
        encode_json(FrameType.SIGNAL, {"signum": 2}),
    ]
    mutated = bytearray()
    for _ in range(200):
        frame = bytearray(rng.choice(templates))
        position = rng.randrange(len(frame))
        frame[position] ^= rng.randrange(1, 256)
        mutated += frame[: rng.randrange(len(frame) // 2, len(frame) + 1)] if rng.random() < 0.3 else frame
    cases.append(("200 mutated and cut frames", bytes(mutated)))
    return cases


@pytest.mark.slow
def test_garbage_on_the_host_channel_never_kills_the_agent(
    loop: vh.LoopThread, engine: QemuEngine, forkvm_template: str
) -> None:
    fork = vh.fork(loop, engine, forkvm_template)
    machine: QemuMachine = fork.machine
    link = machine.link
    assert link is not None
    try:
        assert vh.kernel_info(fork.client)["content"]["status"] == "ok"
        kernel_pid = vh.evaluate(fork.client, "import os", "os.getpid()")
        outcomes = []
        for name, garbage in _garbage_cases():
            errors_before = len(link.guest_errors)

            async def send_and_ping(data: bytes = garbage) -> float:
                await link.send_raw(data)
                # Whatever came before, a complete frame after it is read (resynchronisation).
                return await asyncio.wait_for(link.ping(), 60)

            try:
                loop.run(send_and_ping())
            except (TimeoutError, asyncio.TimeoutError):
                pytest.fail(f"no PONG within 60 s after {name} (errors: {link.guest_errors[errors_before:][:3]})")
            new_errors = link.guest_errors[errors_before:]
            outcomes.append((name, len(new_errors), new_errors[:1]))
            assert not link.closed, f"agent channel closed after {name}"
            assert machine.poll() is None, f"VM died after {name}: {machine.diagnostics()}"
            assert link.kernel_exit is None, f"kernel exited after {name}"
        for name, count, first in outcomes:
            print(f"{name}: {count} ERROR frame(s) {first}")
        silent = [
            name for name, count, _ in outcomes
            if count == 0 and name not in ("CLOSE for an unknown stream",
                                           "OPEN to a port that is not a kernel port", "OPEN on stream 0")
        ]  # fmt: skip
        # A refused OPEN is answered with CLOSE, and CLOSE of an unknown stream is a no-op.
        assert not silent, f"no ERROR frame for: {silent}"

        # A stream to a port that is no kernel port is refused (CLOSE), not opened.
        with pytest.raises(GuestError, match="refused"):
            loop.run(link.open_stream(22, timeout=60))

        # After all that: PING answers, the kernel process is the same, a fresh stream works.
        loop.run(asyncio.wait_for(link.ping(), 60))
        fresh = vh.make_client(fork.ports, fork.params.key)
        fork.extra_clients.append(fresh)
        assert vh.kernel_info(fresh)["content"]["status"] == "ok"
        assert vh.evaluate(fresh, "import os", "os.getpid()") == kernel_pid
        assert vh.evaluate(fork.client, "x = 6 * 7", "x") == 42
    finally:
        vh.release(loop, fork)
