"""`python -m forkvm_image`: build (or find cached) the guest image and say where it is."""

from __future__ import annotations

import time

from . import build_image


def main() -> None:
    started = time.monotonic()
    image = build_image()
    print(f"kernel     {image.kernel} ({image.kernel.stat().st_size / 1e6:.1f} MB)")
    print(f"vmlinux    {image.kernel.with_name('vmlinux')}")
    print(f"initramfs  {image.initramfs} ({image.initramfs.stat().st_size / 1e6:.1f} MB)")
    print(f"cmdline    {image.cmdline}")
    print(f"image hash {image.image_hash}")
    print(f"ready in {time.monotonic() - started:.2f} s")


main()
