"""The virtio-mmio (version 2) transport: registers, feature negotiation, queue setup, status,
and the two event paths KVM offers: queue notifications arrive on an ioeventfd per queue, and
interrupts leave through an irqfd, so neither needs a vCPU exit to reach the device thread.

Register values written by the guest are checked here (queue selector, sizes, addresses on
QUEUE_READY, status transitions); a bad value sets DEVICE_NEEDS_RESET instead of raising.
"""

from __future__ import annotations

import os
import struct
import threading
from typing import Protocol

from vmcore.devices.virtio.queue import Queue, QueueError
from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.memory import GuestMemory

MMIO_SIZE = 0x1000
MAGIC = 0x74726976
VERSION = 2
VENDOR_ID = 0x554D4551
VIRTIO_F_VERSION_1 = 1 << 32

STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

INT_USED_RING = 1
INT_CONFIG = 2

NOTIFY_OFFSET = 0x50
CONFIG_OFFSET = 0x100


class VirtioBackend(Protocol):
    """The device behind the transport."""

    device_id: int
    features: int
    queue_sizes: tuple[int, ...]

    def read_config(self, offset: int, size: int) -> bytes: ...

    def activate(self, transport: "MmioTransport") -> None: ...

    def reset(self) -> None: ...


class MmioTransport:
    def __init__(self, backend: VirtioBackend, memory: GuestMemory) -> None:
        self.backend = backend
        self.memory = memory
        self.lock = threading.RLock()
        self.queues = [Queue(size) for size in backend.queue_sizes]
        self.queue_events = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in self.queues]
        self.irq_event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.status = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.failure = ""

    def attach(self, vm_fd: int, base: int, gsi: int) -> None:
        """Route notifications and the interrupt through KVM (ioeventfd per queue, irqfd)."""
        for index, event in enumerate(self.queue_events):
            k.ioeventfd(vm_fd, s.KvmIoeventfd(
                datamatch=index, addr=base + NOTIFY_OFFSET, len=4, fd=event,
                flags=k.IOEVENTFD_FLAG_DATAMATCH,
            ))
        k.irqfd(vm_fd, self.irq_event, gsi)

    @property
    def activated(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.status & STATUS_NEEDS_RESET

    # --- events out ----------------------------------------------------------------------------
    def signal_used(self) -> None:
        with self.lock:
            self.interrupt_status |= INT_USED_RING
        os.eventfd_write(self.irq_event, 1)

    def fail(self, reason: str) -> None:
        """The guest misprogrammed the device: stop using it until the driver resets it."""
        with self.lock:
            self.failure = reason
            self.status |= STATUS_NEEDS_RESET
            self.interrupt_status |= INT_CONFIG
        os.eventfd_write(self.irq_event, 1)

    # --- registers -------------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        with self.lock:
            if offset >= CONFIG_OFFSET:
                return self.backend.read_config(offset - CONFIG_OFFSET, size)
            if size != 4 or offset % 4:
                return bytes(size)
            return struct.pack("<I", self._read_register(offset))

    def _read_register(self, offset: int) -> int:
        queue = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        if offset == 0x00:
            return MAGIC
        if offset == 0x04:
            return VERSION
        if offset == 0x08:
            return self.backend.device_id
        if offset == 0x0C:
            return VENDOR_ID
        if offset == 0x10:
            features = self.backend.features | VIRTIO_F_VERSION_1
            return (features >> (32 * self.device_features_sel)) & 0xFFFFFFFF if self.device_features_sel < 2 else 0
        if offset == 0x34:
            return queue.max_size if queue else 0
        if offset == 0x44:
            return int(queue.ready) if queue else 0
        if offset == 0x60:
            return self.interrupt_status
        if offset == 0x70:
            return self.status
        if offset == 0xFC:
            return self.config_generation
        return 0

    def write(self, offset: int, data: bytes) -> None:
        if offset == NOTIFY_OFFSET and len(data) == 4:
            # Reached only when no ioeventfd caught the write (the test harness's path).
            index = int.from_bytes(data, "little")
            if index < len(self.queue_events):
                os.eventfd_write(self.queue_events[index], 1)
            return
        if offset >= CONFIG_OFFSET or len(data) != 4 or offset % 4:
            return  # vsock's config is read-only; odd-sized register writes are ignored
        value = int.from_bytes(data, "little")
        with self.lock:
            self._write_register(offset, value)

    def _write_register(self, offset: int, value: int) -> None:
        queue = self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None
        setup = not self.status & STATUS_DRIVER_OK
        if offset == 0x14:
            self.device_features_sel = value
        elif offset == 0x20:
            if self.driver_features_sel < 2 and setup:
                shift = 32 * self.driver_features_sel
                self.driver_features &= ~(0xFFFFFFFF << shift)
                self.driver_features |= value << shift
        elif offset == 0x24:
            self.driver_features_sel = value
        elif offset == 0x30:
            self.queue_sel = value
        elif offset == 0x64:
            self.interrupt_status &= ~value
        elif offset == 0x70:
            self._set_status(value)
        elif queue is not None and setup and not queue.ready:
            self._write_queue_register(queue, offset, value)

    def _write_queue_register(self, queue: Queue, offset: int, value: int) -> None:
        if offset == 0x38:
            queue.size = value
        elif offset == 0x44:
            if value == 1:
                try:
                    queue.validate(self.memory)
                except QueueError as exc:
                    self.fail(str(exc))
                    return
                queue.ready = True
        elif offset in (0x80, 0x84, 0x90, 0x94, 0xA0, 0xA4):
            name = {0x80: "desc_table", 0x90: "avail_ring", 0xA0: "used_ring"}[offset & ~4]
            shift = 32 if offset & 4 else 0
            old = getattr(queue, name)
            setattr(queue, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _set_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            offered = self.backend.features | VIRTIO_F_VERSION_1
            if self.driver_features & ~offered or not self.driver_features & VIRTIO_F_VERSION_1:
                value &= ~STATUS_FEATURES_OK  # the driver sees FEATURES_OK unset: refused
        newly_ok = value & STATUS_DRIVER_OK and not self.status & STATUS_DRIVER_OK
        self.status = value
        if newly_ok:
            if not all(queue.ready for queue in self.queues):
                self.fail("DRIVER_OK with a queue not ready")
                return
            self.backend.activate(self)

    def reset(self) -> None:
        with self.lock:
            self.backend.reset()
            for queue in self.queues:
                queue.reset()
            self.status = 0
            self.interrupt_status = 0
            self.driver_features = 0
            self.queue_sel = 0
            self.failure = ""

    def close(self) -> None:
        for fd in [*self.queue_events, self.irq_event]:
            os.close(fd)
        self.queue_events = []
