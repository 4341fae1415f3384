"""One running VM: KVM VM + guest RAM + devices on two buses + a vCPU thread.

The run loop handles exits in the vCPU's own thread: port I/O and MMIO go to the buses, refused
instructions to `compat`, anything else ends the VM with a recorded reason. Device failures
caused by guest input are contained by the devices themselves; a failure that escapes them stops
this VM only.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections import Counter
from pathlib import Path

from vmcore import compat
from vmcore.devices.bus import Bus
from vmcore.devices.registry import DeviceSpec, persist_of
from vmcore.kvm import kick, vcpu_state, vm_state
from vmcore.kvm.ioctls import KvmError
from vmcore.kvm.memory import GuestMemory
from vmcore.kvm.snapshot import MEMORY_FILE, SnapshotState
from vmcore.kvm.vm import (
    EXIT_INTERNAL_ERROR,
    EXIT_INTR,
    EXIT_IO,
    EXIT_MMIO,
    EXIT_SHUTDOWN,
    EXIT_SYSTEM_EVENT,
    IO_OUT,
    Vcpu,
    Vm,
)

log = logging.getLogger(__name__)

MACHINE_SECTION_VERSION = 1
STATUS_KILLED = -9
STATUS_GUEST_FAULT = 1


class MicroVm:
    def __init__(self, vm: Vm, memory: GuestMemory, name: str = "vm") -> None:
        self.name = name
        self.vm = vm
        try:
            vm.set_memory(memory)
        except BaseException:
            memory.close()
            raise
        self.memory = memory
        self.pio = Bus()
        self.mmio = Bus()
        self.devices: dict[str, tuple[DeviceSpec, object]] = {}
        self.exit_status: int | None = None
        self.exit_reason = ""
        self.completions: Counter[str] = Counter()
        self.exits: Counter[int] = Counter()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._done = threading.Event()

    @property
    def vcpu(self) -> Vcpu:
        """The boot vCPU (vmcore VMs have one)."""
        return self.vm.vcpus[0]

    def add_device(self, spec: DeviceSpec, device: object) -> None:
        self.devices[spec.name] = (spec, device)

    # --- running -------------------------------------------------------------------------------
    def run_once(self) -> int:
        """One KVM_RUN and the handling of its exit; the exit reason (EXIT_INTR on a kick)."""
        vcpu = self.vcpu
        try:
            reason = vcpu.run()
        except KvmError as exc:
            if exc.errno == errno.EINTR:
                return EXIT_INTR
            raise
        self.exits[reason] += 1
        if reason == EXIT_IO:
            direction, size, port, count, offset = vcpu.io_exit()
            if size not in (1, 2, 4) or count * size > len(vcpu.run_area) - offset:
                self._finish(STATUS_GUEST_FAULT, f"malformed I/O exit at port {port:#x}")
                return reason
            area = vcpu.run_area
            for i in range(count):
                at = offset + i * size
                if direction == IO_OUT:
                    self.pio.write(port, bytes(area[at : at + size]))
                else:
                    area[at : at + size] = self.pio.read(port, size)
        elif reason == EXIT_MMIO:
            address, data, length, is_write = vcpu.mmio_exit()
            if length > 8:
                self._finish(STATUS_GUEST_FAULT, f"MMIO access of {length} bytes")
            elif is_write:
                self.mmio.write(address, data[:length])
            else:
                vcpu.set_mmio_data(self.mmio.read(address, length))
        elif reason == EXIT_INTERNAL_ERROR:
            try:
                self.completions[compat.complete_instruction(vcpu, self.memory)] += 1
            except compat.UnhandledInstruction as exc:
                self._finish(STATUS_GUEST_FAULT, str(exc))
        elif reason in (EXIT_SHUTDOWN, EXIT_SYSTEM_EVENT):
            self._finish(0 if reason == EXIT_SYSTEM_EVENT else STATUS_GUEST_FAULT,
                         "guest shut down" if reason == EXIT_SYSTEM_EVENT else "triple fault")
        elif reason != EXIT_INTR:
            self._finish(STATUS_GUEST_FAULT, f"unexpected KVM exit {reason}")
        return reason

    def _finish(self, status: int, reason: str) -> None:
        if self.exit_status is None:
            self.exit_status = status
            self.exit_reason = reason
            log.info("%s stopped: %s", self.name, reason)

    def _loop(self) -> None:
        try:
            while not self._stop and self.exit_status is None:
                self.run_once()
        except Exception as exc:  # an escaped failure stops this VM, never the host process
            log.exception("%s: vCPU loop failed", self.name)
            self._finish(STATUS_GUEST_FAULT, f"vCPU loop failed: {exc}")
        finally:
            self._done.set()

    def start(self) -> None:
        """Run the vCPU in its own thread until pause(), kill() or the guest stops."""
        if self._thread is not None and self._thread.is_alive():
            return
        kick.install()
        self._stop = False
        self._done.clear()
        self.vcpu.set_immediate_exit(False)
        self._thread = threading.Thread(target=self._loop, name=f"vcpu-{self.name}", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> bool:
        """True once the vCPU thread has ended."""
        return self._done.wait(timeout)

    def request_stop(self) -> None:
        """Make the vCPU thread stop at its next exit; safe from any thread, including the vCPU
        thread itself (a device callback). pause() then waits for it."""
        self._stop = True
        self.vcpu.set_immediate_exit(True)

    def pause(self) -> None:
        """Stop the vCPU thread and leave the vCPU at an instruction boundary."""
        thread = self._thread
        if thread is not None:
            self._stop = True
            self.vcpu.set_immediate_exit(True)
            while thread.is_alive():
                kick.kick(thread)
                thread.join(0.01)
            self._thread = None
        if self.vm.fd >= 0 and self.exit_status is None:
            # A KVM_RUN with immediate_exit completes a pending I/O or MMIO read, so the
            # captured registers hold its result.
            self.vcpu.set_immediate_exit(True)
            self.run_once()
            self.vcpu.set_immediate_exit(False)

    def kill(self) -> None:
        self.pause()
        self._finish(STATUS_KILLED, "killed")
        for _, device in self.devices.values():
            close = getattr(device, "close", None)
            if close is not None:
                close()
        self.devices.clear()
        self.vm.close()

    # --- snapshots -------------------------------------------------------------------------------
    def capture(self) -> SnapshotState:
        """The state sections of this (paused) VM."""
        state = SnapshotState()
        machine = {
            "memory_size": self.memory.size,
            "vcpus": len(self.vm.vcpus),
            "devices": [spec.to_json() for spec, _ in self.devices.values()],
        }
        state.put("machine", MACHINE_SECTION_VERSION, json.dumps(machine).encode())
        state.put("vm", vm_state.VERSION, vm_state.VmState.capture(self.vm).to_bytes())
        for vcpu in self.vm.vcpus:
            captured = vcpu_state.VcpuState.capture(vcpu, self.vm.kvm)
            state.put(f"vcpu{vcpu.id}", vcpu_state.VERSION, captured.to_bytes())
        for spec, device in self.devices.values():
            persist = persist_of(spec.kind)
            state.put(f"device/{spec.name}", persist.VERSION, persist.save(device))
        return state

    def snapshot(self, directory: Path) -> None:
        """Pause, write RAM and state to `directory`; the VM stays paused."""
        self.pause()
        directory.mkdir(parents=True, exist_ok=True)
        state = self.capture()
        self.memory.save(directory / MEMORY_FILE)
        state.write(directory)

    def private_memory_bytes(self) -> int:
        return self.memory.private_bytes()
