"""forkvm_image: builds and caches the guest image (kernel + initramfs) every forkvm VM boots.

    image = build_image()          # cached: a second call returns in well under a second
    image.kernel, image.initramfs, image.cmdline, image.image_hash

`image.kernel` is the bzImage; the uncompressed ELF `vmlinux` and the final kernel `config`
sit next to it (`image.kernel.with_name("vmlinux")`). Backends append their own device
parameters to `cmdline`. `python -m forkvm_image` builds and prints all of it.
"""

from __future__ import annotations

from vmcore.engine import GuestImage, ProgressCallback

from . import cache
from .cmdline import BASE_CMDLINE
from .kernel_build import build_kernel, kernel_inputs_hash
from .progress import rich_progress
from .rootfs import build_initramfs, rootfs_inputs_hash

__all__ = ["BASE_CMDLINE", "build_image", "image_inputs_hash"]


def image_inputs_hash() -> str:
    """Identifies the image from its inputs alone (no build, no artifact hashing): a template
    whose recorded hash differs was made from another image and must be rebuilt."""
    return cache.digest([kernel_inputs_hash(), rootfs_inputs_hash(), BASE_CMDLINE])


def build_image(progress: ProgressCallback | None = None) -> GuestImage:
    """Build (or find in the cache) the guest kernel and initramfs."""
    if progress is None:
        with rich_progress() as display:
            return build_image(display)
    kernel = build_kernel(progress)
    initramfs = build_initramfs(progress)
    return GuestImage(kernel=kernel.bzimage, initramfs=initramfs, image_hash=image_inputs_hash(), cmdline=BASE_CMDLINE)
