"""Forks made ahead of time, so a launch skips the restore (and, optionally, the resume).

hold="paused": members are restored and paused; a launch resumes one (CPU start, entropy,
key, clock), paying the guest's resume work on the launch path.
hold="resumed": members are restored and resumed with their own fresh ResumeParams, then
idle; a launch only hands over the connection. Each member is still unique: its entropy,
key and session were made for it alone, and its clock runs from the moment it was resumed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Callable

from vmcore.engine import Engine, Machine, ResumeParams
from vmcore.errors import EngineError

log = logging.getLogger(__name__)
RETRY_AFTER_FAILURE_S = 5.0


class WarmPool:
    def __init__(
        self,
        engine: Engine,
        template: str,
        size: int,
        hold: str = "resumed",
        params: Callable[[], ResumeParams] = ResumeParams,
    ) -> None:
        if hold not in ("paused", "resumed"):
            raise ValueError(f"hold must be 'paused' or 'resumed', not {hold!r}")
        self.engine = engine
        self.template = template
        self.size = size
        self.hold = hold
        self._params = params
        self._members: collections.deque[Machine] = collections.deque()
        self._refill: asyncio.Task[None] | None = None
        self._closed = False
        self.last_error: str | None = None

    def __len__(self) -> int:
        return len(self._members)

    def take(self) -> Machine | None:
        """A member (see `hold`), or None when the pool is empty; refills behind."""
        machine = None
        while self._members:
            candidate = self._members.popleft()
            if candidate.kernel_exit_status() is None:
                machine = candidate
                break
            asyncio.ensure_future(candidate.kill())
        self.fill()
        return machine

    def resize(self, size: int) -> None:
        self.size = max(0, size)
        while len(self._members) > self.size:
            asyncio.ensure_future(self._members.pop().kill())
        self.fill()

    def fill(self) -> None:
        if not self._closed and (self._refill is None or self._refill.done()):
            self._refill = asyncio.ensure_future(self._fill())

    async def _fill(self) -> None:
        while not self._closed and len(self._members) < self.size:
            machine: Machine | None = None
            try:
                machine = await self.engine.restore(self.template)
                if self.hold == "resumed":
                    await machine.resume(self._params())
            except asyncio.CancelledError:
                # close() cancelled us mid-restore: the half-made member belongs to nobody.
                if machine is not None:
                    await machine.kill()
                raise
            except EngineError as exc:
                self.last_error = str(exc)
                log.warning("warm pool for %s: restore failed: %s", self.template, exc)
                await asyncio.sleep(RETRY_AFTER_FAILURE_S)
                continue
            if self._closed:
                await machine.kill()
                return
            self.last_error = None
            self._members.append(machine)

    async def close(self) -> None:
        self._closed = True
        if self._refill is not None:
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)
        members, self._members = list(self._members), collections.deque()
        await asyncio.gather(*(m.kill() for m in members), return_exceptions=True)
