"""The virtio-vsock device: queues (RX 0, TX 1, event 2), the guest CID, and the device thread
that moves packets between the queues and the muxer.

Queue work happens only in the device thread, under the transport lock, so register accesses
from the vCPU thread and snapshots see a consistent device.
"""

from __future__ import annotations

import logging
import os
import select
import struct
import threading
from pathlib import Path
from typing import Any

from vmcore.devices.virtio.mmio import MMIO_SIZE, MmioTransport
from vmcore.devices.virtio.queue import QueueError
from vmcore.devices.virtio.vsock import packet as p
from vmcore.devices.virtio.vsock.muxer import Muxer

log = logging.getLogger(__name__)
DEVICE_ID = 19
QUEUE_SIZE = 256
RXQ, TXQ, EVQ = 0, 1, 2
EVENT_TRANSPORT_RESET = 0
MAX_PACKETS_PER_PASS = 256


class VsockDevice:
    device_id = DEVICE_ID
    features = 0
    queue_sizes = (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE)

    def __init__(self, guest_cid: int, uds_path: Path, memory: Any) -> None:
        if not 3 <= guest_cid < 1 << 32:
            raise ValueError(f"guest CID {guest_cid} invalid")
        self.guest_cid = guest_cid
        self.transport = MmioTransport(self, memory)
        self.memory = memory
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.muxer = Muxer(uds_path, guest_cid)
        self.dropped_packets = 0
        self._pending_reply: list[p.Packet] = []
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=f"vsock-{guest_cid}", daemon=True)
        self._thread.start()

    # --- VirtioBackend ---------------------------------------------------------------------------
    def read_config(self, offset: int, size: int) -> bytes:
        config = struct.pack("<Q", self.guest_cid)
        return config[offset : offset + size].ljust(size, b"\x00") if offset < 8 else bytes(size)

    def activate(self, transport: MmioTransport) -> None:
        self.wake()

    def reset(self) -> None:
        self.muxer.reset_all()
        self._pending_reply.clear()

    # --- device thread ---------------------------------------------------------------------------
    def wake(self) -> None:
        os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        epoll = select.epoll()
        registered: dict[int, int] = {}
        try:
            for fd in [*self.transport.queue_events, self._wake_fd]:
                epoll.register(fd, select.EPOLLIN)
            while not self._closing:
                self._update_interest(epoll, registered)
                for fd, events in epoll.poll():
                    if fd in self.transport.queue_events or fd == self._wake_fd:
                        try:
                            os.eventfd_read(fd)
                        except BlockingIOError:
                            pass
                    else:
                        with self.transport.lock:
                            self.muxer.on_host_event(fd, events)
                if self._closing:
                    break
                self.process()
        except Exception:
            log.exception("vsock device thread of CID %d failed", self.guest_cid)
        finally:
            epoll.close()

    def _update_interest(self, epoll: select.epoll, registered: dict[int, int]) -> None:
        with self.transport.lock:
            wanted = self.muxer.fds()
        for fd in list(registered):
            if fd not in wanted:
                del registered[fd]
                try:
                    epoll.unregister(fd)
                except (OSError, ValueError):
                    pass  # already closed, which removed it from the epoll set
        for fd, mask in wanted.items():
            if fd not in registered:
                epoll.register(fd, mask)
            elif registered[fd] != mask:
                epoll.modify(fd, mask)
            registered[fd] = mask

    def process(self) -> None:
        """One pass: take the guest's TX packets, fill its RX buffers, raise the interrupt."""
        transport = self.transport
        with transport.lock:
            if not transport.activated:
                return
            try:
                used = self._process_tx() | self._process_rx()
            except QueueError as exc:
                log.warning("vsock CID %d: %s; device needs reset", self.guest_cid, exc)
                transport.fail(str(exc))
                self.muxer.reset_all()
                return
        if used:
            transport.signal_used()

    def _process_tx(self) -> bool:
        queue, memory = self.transport.queues[TXQ], self.memory
        used = False
        for _ in range(MAX_PACKETS_PER_PASS):
            chain = queue.pop(memory)
            if chain is None:
                break
            try:
                reply = self.muxer.on_guest_packet(p.parse_tx(memory, chain))
                if reply is not None:
                    self._pending_reply.append(reply)
            except p.PacketError as exc:
                self.dropped_packets += 1
                log.debug("vsock CID %d dropped a packet: %s", self.guest_cid, exc)
            queue.add_used(memory, chain.head, 0)
            used = True
        if queue.pending(memory):
            self.wake()  # more than one pass's worth: come back after the RX side had a turn
        return used

    def _process_rx(self) -> bool:
        queue, memory = self.transport.queues[RXQ], self.memory
        used = False
        for _ in range(MAX_PACKETS_PER_PASS):
            chain = queue.pop(memory)
            if chain is None:
                break
            capacity = p.rx_capacity(chain)
            if capacity < 0:
                raise QueueError(f"RX buffer of {chain.writable_length()} bytes cannot hold a header")
            packet = self._pending_reply.pop(0) if self._pending_reply else self.muxer.next_packet(capacity)
            if packet is None:
                queue.undo_pop()
                break
            queue.add_used(memory, chain.head, p.write_rx(memory, chain, packet))
            used = True
        return used

    def send_transport_reset(self) -> None:
        """Tell the guest every stream it had is gone (after a restore from a snapshot)."""
        transport = self.transport
        with transport.lock:
            if not transport.activated:
                return
            queue = transport.queues[EVQ]
            try:
                chain = queue.pop(self.memory)
                if chain is None or chain.writable_length() < 4:
                    return
                self.memory.write(chain.writable[0].address, struct.pack("<I", EVENT_TRANSPORT_RESET))
                queue.add_used(self.memory, chain.head, 4)
            except QueueError as exc:
                transport.fail(str(exc))
                return
        transport.signal_used()

    def close(self) -> None:
        self._closing = True
        self.wake()
        self._thread.join()
        self.muxer.close()
        self.transport.close()
        os.close(self._wake_fd)


def build(machine: Any, spec: Any, **host: Any) -> VsockDevice:
    """Registry factory: config {"base": MMIO address, "irq": GSI, "cid": guest CID}; the host
    gives the Unix socket path as `vsock_path`."""
    path = host.get("vsock_path")
    if path is None:
        raise ValueError("a vsock device needs a host Unix socket path (vsock_path)")
    base, irq = int(spec.config["base"]), int(spec.config["irq"])
    device = VsockDevice(int(spec.config.get("cid", 3)), Path(path), machine.memory)
    machine.mmio.register(base, MMIO_SIZE, device.transport)
    device.transport.attach(machine.vm.fd, base, irq)
    return device
