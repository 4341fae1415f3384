"""Building a template: the guest image (cached by its inputs), then a warm VM saved by the engine."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from vmcore.engine import Engine, GuestImage

Progress = Callable[[str, float | None], None]


def _describe(template: Any, up_to_date: bool) -> dict[str, Any]:
    return {
        "name": template.name,
        "backend": template.backend,
        "memory_mib": template.memory_mib,
        "image_hash": template.image_hash,
        "size_bytes": template.size_bytes,
        "up_to_date": up_to_date,
    }


async def guest_image(progress: Progress) -> GuestImage:
    """Build or fetch the cached guest image in a thread, relaying its progress."""
    import forkvm_image

    loop = asyncio.get_running_loop()

    def relay(stage: str, fraction: float | None) -> None:
        loop.call_soon_threadsafe(progress, f"guest image: {stage}", fraction)

    return await asyncio.to_thread(forkvm_image.build_image, relay)


async def build_template(engine: Engine, name: str, memory_mib: int, force: bool, progress: Progress) -> dict[str, Any]:
    import forkvm_image

    wanted_hash = forkvm_image.image_inputs_hash()
    existing = next((t for t in engine.templates() if t.name == name), None)
    if (
        existing is not None
        and not force
        and existing.image_hash == wanted_hash
        and existing.memory_mib == memory_mib
        and existing.backend_version == engine.backend_version
        and engine.template_is_current(name)
    ):
        progress(f"template {name} is up to date", 1.0)
        return _describe(existing, up_to_date=True)
    image = await guest_image(progress)
    template = await engine.build_template(name, image, memory_mib, progress)
    return _describe(template, up_to_date=False)
