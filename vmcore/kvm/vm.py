"""File-descriptor owners: the /dev/kvm handle, a VM and its vCPUs, each closed exactly once."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from functools import cached_property

from vmcore.kvm import ioctls as k
from vmcore.kvm import structs as s
from vmcore.kvm.memory import GuestMemory

# Standard places for the two pages KVM needs below 4 GiB on Intel (same as QEMU/Firecracker).
TSS_ADDRESS = 0xFFFBD000
IDENTITY_MAP_ADDRESS = 0xFFFBC000

EXIT_IO = 2
EXIT_HLT = 5
EXIT_MMIO = 6
EXIT_SHUTDOWN = 8
EXIT_FAIL_ENTRY = 9
EXIT_INTR = 10
EXIT_INTERNAL_ERROR = 17
EXIT_SYSTEM_EVENT = 24
IO_OUT = 1

_EXIT_HEADER = struct.Struct("<I")  # exit_reason at offset 8
_IO_EXIT = struct.Struct("<BBHIQ")  # direction, size, port, count, data_offset at 32
_MMIO_EXIT = struct.Struct("<Q8sIB")  # phys_addr, data, len, is_write at 32
_INTERNAL_EXIT = struct.Struct("<II")  # suberror, ndata at 32


class Kvm:
    """The /dev/kvm handle and what it reports once (MSR list, supported CPUID)."""

    _shared: "Kvm | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        version = k.get_api_version(self.fd)
        if version != 12:
            os.close(self.fd)
            raise k.KvmError("KVM_GET_API_VERSION", errno.EINVAL, f"API version {version}, not 12")
        self.vcpu_mmap_size = k.get_vcpu_mmap_size(self.fd)

    @classmethod
    def shared(cls) -> "Kvm":
        with cls._lock:
            if cls._shared is None:
                cls._shared = cls()
            return cls._shared

    @cached_property
    def supported_cpuid(self) -> ctypes.Structure:
        return k.get_supported_cpuid(self.fd)

    @cached_property
    def msr_indices(self) -> list[int]:
        return k.get_msr_index_list(self.fd)


class Vcpu:
    def __init__(self, vm: "Vm", vcpu_id: int) -> None:
        self.id = vcpu_id
        self.fd = k.create_vcpu(vm.fd, vcpu_id)
        self.run_area = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size)
        self._run_address = ctypes.addressof(ctypes.c_char.from_buffer(self.run_area))
        self._immediate_exit = ctypes.c_uint8.from_address(self._run_address + 1)

    def run(self) -> int:
        """Enter the guest until the next exit; the exit reason. EINTR surfaces as KvmError."""
        k.run(self.fd)
        return _EXIT_HEADER.unpack_from(self.run_area, 8)[0]

    def set_immediate_exit(self, value: bool) -> None:
        """With it set, KVM_RUN returns EINTR at once: closes the race with a kick signal."""
        self._immediate_exit.value = 1 if value else 0

    def io_exit(self) -> tuple[int, int, int, int, int]:
        """(direction, size, port, count, data_offset) of an EXIT_IO."""
        return _IO_EXIT.unpack_from(self.run_area, 32)

    def mmio_exit(self) -> tuple[int, bytes, int, int]:
        """(phys_addr, data[8], len, is_write) of an EXIT_MMIO."""
        return _MMIO_EXIT.unpack_from(self.run_area, 32)

    def set_mmio_data(self, data: bytes) -> None:
        self.run_area[40 : 40 + len(data)] = data

    def internal_error(self) -> tuple[int, list[int]]:
        suberror, ndata = _INTERNAL_EXIT.unpack_from(self.run_area, 32)
        data = struct.unpack_from("<16Q", self.run_area, 40)
        return suberror, list(data[: min(ndata, 16)])

    def close(self) -> None:
        if self.fd < 0:
            return
        del self._immediate_exit
        self.run_area.close()
        os.close(self.fd)
        self.fd = -1


class Vm:
    """One KVM VM with an in-kernel irqchip and PIT (so forks of any VM restore the same set)."""

    def __init__(self, kvm: Kvm | None = None, vcpus: int = 1) -> None:
        self.kvm = kvm or Kvm.shared()
        self.fd = k.create_vm(self.kvm.fd)
        self.vcpus: list[Vcpu] = []
        self.memory: GuestMemory | None = None
        try:
            k.set_tss_addr(self.fd, TSS_ADDRESS)
            k.set_identity_map_addr(self.fd, IDENTITY_MAP_ADDRESS)
            k.create_irqchip(self.fd)
            k.create_pit2(self.fd)
            for vcpu_id in range(vcpus):
                vcpu = Vcpu(self, vcpu_id)
                self.vcpus.append(vcpu)
                k.set_cpuid2(vcpu.fd, self.kvm.supported_cpuid)
        except BaseException:
            self.close()
            raise

    def set_memory(self, memory: GuestMemory) -> None:
        """Map `memory` at guest physical 0 (slot 0); the VM owns it from now on."""
        region = s.KvmUserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=memory.size,
            userspace_addr=memory.host_address,
        )
        k.set_user_memory_region(self.fd, region)
        self.memory = memory

    def irq_line(self, irq: int, level: int) -> None:
        k.irq_line(self.fd, irq, level)

    def close(self) -> None:
        """Close vCPUs before the VM and unmap RAM last: KVM holds references until then."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.memory is not None:
            self.memory.close()
            self.memory = None
