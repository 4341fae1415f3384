"""virtio-vsock driven by a Python driver through real guest memory and a real KVM VM."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from tests.vmcore.virtio_driver import GUEST_CID, QUEUE_SIZE, VsockDriver
from vmcore.devices import registry
from vmcore.devices.virtio import mmio
from vmcore.devices.virtio.queue import DESC_F_NEXT, DESC_F_WRITE
from vmcore.devices.virtio.vsock import packet as p
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.vm import Vm
from vmcore.microvm import MicroVm

pytestmark = pytest.mark.usefixtures("kvm_available")
MMIO_BASE = 0xD0000000
GUEST_PORT = 1024


@pytest.fixture
def setup(tmp_path):
    machine = MicroVm(Vm(), GuestMemory.anonymous(2 << 20), name="vsock-test")
    spec = registry.DeviceSpec("virtio-vsock", "vsock", {"base": MMIO_BASE, "irq": 5, "cid": GUEST_CID})
    device = registry.build(machine, spec, vsock_path=tmp_path / "vsock.sock")
    driver = VsockDriver(device.transport, machine.memory)
    driver.initialise()
    yield machine, device, driver, tmp_path / "vsock.sock"
    machine.kill()


def connect(path, port: int = GUEST_PORT) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(2)
    client.connect(str(path))
    client.sendall(f"CONNECT {port}\n".encode())
    return client


def next_request(driver: VsockDriver) -> p.Packet:
    """The next connection request, skipping resets of streams an earlier step abandoned."""
    deadline = time.monotonic() + 2
    while time.monotonic() < deadline:
        for packet in driver.poll():
            if packet.op == p.OP_REQUEST:
                return packet
            assert packet.op == p.OP_RST, packet
    raise AssertionError("no connection request reached the guest")


def establish(driver: VsockDriver, path) -> tuple[socket.socket, int]:
    client = connect(path)
    request = next_request(driver)
    assert request.dst_port == GUEST_PORT
    assert request.dst_cid == GUEST_CID and request.src_cid == p.HOST_CID
    driver.send(driver.packet(p.OP_RESPONSE, GUEST_PORT, request.src_port))
    line = b""
    while not line.endswith(b"\n"):
        line += client.recv(1)
    assert line == f"OK {request.src_port}\n".encode()
    return client, request.src_port


def test_connect_and_data_both_ways(setup):
    _, _, driver, path = setup
    client, host_port = establish(driver, path)
    client.sendall(b"hello guest")
    (data,) = driver.poll()
    assert data.op == p.OP_RW and data.data == b"hello guest"
    driver.send(driver.packet(p.OP_RW, GUEST_PORT, host_port, b"hello host" * 300))
    received = b""
    while len(received) < 3000:
        received += client.recv(4096)
    assert received == b"hello host" * 300
    # Bytes that are not UTF-8 pass unchanged.
    driver.send(driver.packet(p.OP_RW, GUEST_PORT, host_port, bytes(range(256))))
    got = b""
    while len(got) < 256:
        got += client.recv(4096)
    assert got == bytes(range(256))


def test_guest_refusal_closes_client(setup):
    _, _, driver, path = setup
    client = connect(path, 7777)
    request = next_request(driver)
    driver.send(driver.packet(p.OP_RST, 7777, request.src_port))
    assert client.recv(10) == b""


def test_device_reset_closes_streams(setup):
    _, device, driver, path = setup
    client, _ = establish(driver, path)
    driver.reg(0x70, 0)
    assert device.transport.status == 0
    assert client.recv(10) == b""
    driver.__init__(device.transport, device.memory)
    driver.initialise()  # the device works again after the reset
    client, _ = establish(driver, path)
    client.sendall(b"again")
    assert driver.poll()[0].data == b"again"


def test_guest_initiated_connection_refused(setup):
    _, _, driver, _ = setup
    driver.send(driver.packet(p.OP_REQUEST, 5000, 80))
    (reply,) = driver.poll()
    assert reply.op == p.OP_RST and reply.dst_port == 5000


def test_bad_connect_lines_are_dropped(setup):
    _, _, driver, path = setup
    for line in (b"CONNECT\n", b"CONNECT 99999999999\n", b"HELLO 1\n", b"X" * 100):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(2)
        client.connect(str(path))
        client.sendall(line)
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass  # closed with our bytes unread: also a refusal
    establish(driver, path)  # still serving


def _assert_needs_reset(device, driver, path):
    deadline = time.monotonic() + 2
    while not device.transport.status & mmio.STATUS_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.005)
    assert device.transport.status & mmio.STATUS_NEEDS_RESET, "hostile input was not refused"
    # The device recovers after a driver reset; the host process is fine.
    driver.__init__(device.transport, device.memory)
    driver.initialise()
    establish(driver, path)


def test_hostile_descriptor_outside_ram(setup):
    _, device, driver, path = setup
    ring = driver.rings[1]
    ring.put_descriptor(0, 0xFFFF_FFFF_0000, 64, 0)
    ring.publish(0)
    driver.notify(1)
    _assert_needs_reset(device, driver, path)


def test_hostile_huge_length(setup):
    _, device, driver, path = setup
    ring = driver.rings[1]
    ring.put_descriptor(0, 0x1000, 0xFFFF_FFFF, 0)
    ring.publish(0)
    driver.notify(1)
    _assert_needs_reset(device, driver, path)


def test_hostile_descriptor_loop(setup):
    _, device, driver, path = setup
    ring = driver.rings[1]
    ring.put_descriptor(0, 0x50000, 64, DESC_F_NEXT, 1)
    ring.put_descriptor(1, 0x50000, 64, DESC_F_NEXT, 0)
    ring.publish(0)
    driver.notify(1)
    _assert_needs_reset(device, driver, path)


def test_hostile_descriptor_index_and_avail_index(setup):
    _, device, driver, path = setup
    ring = driver.rings[1]
    ring.put_descriptor(0, 0x50000, 64, DESC_F_NEXT, QUEUE_SIZE + 7)
    ring.publish(0)
    driver.notify(1)
    _assert_needs_reset(device, driver, path)
    driver.memory.write_u16(driver.rings[1].avail + 2, 0x8000)  # jumps past the queue size
    driver.notify(1)
    _assert_needs_reset(device, driver, path)


def test_hostile_packet_lengths_dropped_not_fatal(setup):
    _, device, driver, path = setup
    # A header claiming more payload than the chain holds: dropped, the device goes on.
    bad = driver.packet(p.OP_RW, GUEST_PORT, 1 << 30, b"abc")
    header = bytearray(bad.header())
    struct.pack_into("<I", header, 24, 60000)
    ring = driver.rings[1]
    driver.memory.write(0x60000, bytes(header))
    ring.put_descriptor(0, 0x60000, len(header), 0)
    ring.publish(0)
    ring.next_desc = 1
    driver.notify(1)
    short = (1, 0x60100, 10)  # shorter than a header
    ring.put_descriptor(short[0], short[1], short[2], 0)
    ring.publish(1)
    ring.next_desc = 2
    driver.notify(1)
    deadline = time.monotonic() + 2
    while device.dropped_packets < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert device.dropped_packets == 2
    assert not device.transport.status & mmio.STATUS_NEEDS_RESET
    establish(driver, path)


def test_hostile_queue_configuration(setup):
    _, device, driver, _ = setup
    driver.reg(0x70, 0)
    driver.reg(0x70, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    driver.setup_queue(0, 0x1_0000_0000, 0x2000, 0x3000, 16)  # outside RAM
    assert device.transport.status & mmio.STATUS_NEEDS_RESET
    driver.reg(0x70, 0)
    driver.reg(0x70, mmio.STATUS_ACKNOWLEDGE | mmio.STATUS_DRIVER)
    driver.setup_queue(0, 0x1000, 0x2000, 0x3000, 1000)  # not a power of two, too big
    assert device.transport.status & mmio.STATUS_NEEDS_RESET
    driver.reg(0x70, 0)
    driver.reg(0x30, 99)  # a queue that does not exist
    driver.reg(0x38, 4)
    assert driver.reg(0x34) == 0


def test_rx_buffer_too_small_for_header_fails_device(setup):
    _, device, driver, path = setup
    driver.reg(0x70, 0)
    driver.__init__(device.transport, device.memory)
    driver.initialise()
    ring = driver.rings[0]
    # Replace every published RX buffer with one too small for a packet header.
    for index in range(QUEUE_SIZE):
        ring.put_descriptor(index, 0x50000, 8, DESC_F_WRITE)
    driver.notify(0)
    _assert_needs_reset(device, driver, path)
