"""Loading Linux into guest memory for the 64-bit boot protocol (Documentation/x86/boot.rst).

Independent of the VM that runs it: it writes the kernel, initramfs, command line and zero page
into a GuestMemory and returns where to enter. vmlinux (ELF) is preferred: a bzImage's
decompressor would run in KVM's instruction emulator on software-KVM hosts, which is slow.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmcore.kvm.memory import PAGE, GuestMemory

ZERO_PAGE = 0x7000
CMDLINE_ADDRESS = 0x20000
CMDLINE_MAX = 4096
HIGH_MEMORY = 0x100000
EBDA_START = 0x9FC00
E820_RAM = 1
_HDRS = 0x53726448
_BOOT_FLAG = 0xAA55
_LOADED_HIGH = 0x01
_XLF_KERNEL_64 = 0x01


class LoaderError(Exception):
    """The kernel or initramfs cannot be loaded as given."""


@dataclass(frozen=True)
class LoadedKernel:
    entry: int
    zero_page: int
    kernel_end: int


def _load_elf(memory: GuestMemory, image: bytes) -> tuple[int, int]:
    if image[:4] != b"\x7fELF" or image[4] != 2 or image[5] != 1:
        raise LoaderError("not a 64-bit little-endian ELF")
    entry, phoff = struct.unpack_from("<QQ", image, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", image, 0x36)
    end = 0
    for i in range(phnum):
        p_type, _, p_offset, _, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from(
            "<IIQQQQQQ", image, phoff + i * phentsize
        )
        if p_type != 1:  # PT_LOAD
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(image):
            raise LoaderError("ELF segment larger than the file")
        memory.check(p_paddr, p_memsz)
        memory.write(p_paddr, image[p_offset : p_offset + p_filesz])
        memory.write(p_paddr + p_filesz, bytes(p_memsz - p_filesz))
        end = max(end, p_paddr + p_memsz)
    return entry, end


def _load_bzimage(memory: GuestMemory, image: bytes, zero_page: bytearray) -> tuple[int, int]:
    if len(image) < 0x250 or struct.unpack_from("<I", image, 0x202)[0] != _HDRS:
        raise LoaderError("not a bzImage (no HdrS header)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    xloadflags = struct.unpack_from("<H", image, 0x236)[0]
    if version < 0x020C or not xloadflags & _XLF_KERNEL_64:
        raise LoaderError("bzImage lacks the 64-bit entry point (boot protocol < 2.12)")
    setup_sects = image[0x1F1] or 4
    header_end = 0x202 + image[0x201]
    zero_page[0x1F1:header_end] = image[0x1F1:header_end]
    kernel = image[(setup_sects + 1) * 512 :]
    memory.write(HIGH_MEMORY, kernel)
    return HIGH_MEMORY + 0x200, HIGH_MEMORY + len(kernel)


def load_linux(
    memory: GuestMemory, kernel: Path, initramfs: Path | None, cmdline: str
) -> LoadedKernel:
    image = kernel.read_bytes()
    zero_page = bytearray(PAGE)
    if image[:4] == b"\x7fELF":
        entry, kernel_end = _load_elf(memory, image)
    else:
        entry, kernel_end = _load_bzimage(memory, image, zero_page)
    struct.pack_into("<H", zero_page, 0x1FE, _BOOT_FLAG)
    struct.pack_into("<I", zero_page, 0x202, _HDRS)
    if not struct.unpack_from("<H", zero_page, 0x206)[0]:
        struct.pack_into("<H", zero_page, 0x206, 0x020C)
    zero_page[0x210] = 0xFF  # type_of_loader: undefined
    zero_page[0x211] |= _LOADED_HIGH

    raw_cmdline = cmdline.encode() + b"\x00"
    if len(raw_cmdline) > CMDLINE_MAX:
        raise LoaderError(f"command line longer than {CMDLINE_MAX} bytes")
    memory.write(CMDLINE_ADDRESS, raw_cmdline)
    struct.pack_into("<I", zero_page, 0x228, CMDLINE_ADDRESS)
    struct.pack_into("<I", zero_page, 0x238, len(raw_cmdline) - 1)

    if initramfs is not None:
        blob = initramfs.read_bytes()
        address = (min(memory.size, 1 << 31) - len(blob)) & ~(PAGE - 1)
        if address < kernel_end:
            raise LoaderError("initramfs does not fit above the kernel")
        memory.write(address, blob)
        struct.pack_into("<II", zero_page, 0x218, address, len(blob))

    e820 = [(0, EBDA_START, E820_RAM), (HIGH_MEMORY, memory.size - HIGH_MEMORY, E820_RAM)]
    zero_page[0x1E8] = len(e820)
    for i, (start, size, kind) in enumerate(e820):
        struct.pack_into("<QQI", zero_page, 0x2D0 + 20 * i, start, size, kind)
    memory.write(ZERO_PAGE, bytes(zero_page))
    return LoadedKernel(entry=entry, zero_page=ZERO_PAGE, kernel_end=kernel_end)
