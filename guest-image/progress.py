"""A rich progress display for builds whose caller brings no progress callback of its own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from vmcore.engine import ProgressCallback


@contextlib.contextmanager
def rich_progress() -> Iterator[ProgressCallback]:
    """A ProgressCallback that keeps one line per stage, so the finished stages stay readable."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn()
    ) as display:
        current: dict[str, TaskID] = {}

        def report(stage: str, fraction: float | None) -> None:
            if stage not in current:
                for task in current.values():
                    display.update(task, completed=1.0, total=1.0)
                current.clear()
                current[stage] = display.add_task(stage, total=None if fraction is None else 1.0)
            if fraction is not None:
                display.update(current[stage], total=1.0, completed=fraction)

        yield report
        for task in current.values():
            display.update(task, completed=1.0, total=1.0)
