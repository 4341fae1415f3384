"""What of a virtio-vsock device goes into a snapshot (VERSION 1, JSON): the transport's
negotiated state and each queue's configuration and ring positions. Streams are not saved:
their host ends cannot be; a restored device sends the guest a TRANSPORT_RESET event instead,
so the guest drops them (listening sockets survive)."""

from __future__ import annotations

import json

from vmcore.devices.virtio.vsock.device import VsockDevice

VERSION = 1
_TRANSPORT = ("device_features_sel", "driver_features_sel", "driver_features", "queue_sel",
              "status", "interrupt_status", "config_generation")
_QUEUE = ("size", "ready", "desc_table", "avail_ring", "used_ring", "next_avail", "next_used")


def save(device: VsockDevice) -> bytes:
    transport = device.transport
    with transport.lock:
        return json.dumps({
            "cid": device.guest_cid,
            "transport": {name: getattr(transport, name) for name in _TRANSPORT},
            "queues": [{name: getattr(q, name) for name in _QUEUE} for q in transport.queues],
        }).encode()


def restore(device: VsockDevice, data: bytes) -> None:
    saved = json.loads(data)
    if saved["cid"] != device.guest_cid or len(saved["queues"]) != len(device.transport.queues):
        raise ValueError("saved vsock device does not match the one being restored")
    transport = device.transport
    with transport.lock:
        for name in _TRANSPORT:
            setattr(transport, name, int(saved["transport"][name]))
        for queue, values in zip(transport.queues, saved["queues"]):
            for name in _QUEUE:
                setattr(queue, name, bool(values[name]) if name == "ready" else int(values[name]))
            if queue.ready:
                queue.validate(device.memory)
    device.send_transport_reset()
    device.wake()
