"""Who waits on a job: the events streams (``GET /jobs/{id}/events``) of this process, woken when the
runner or a route changes the job here. Changes made by another replica are not seen here; the streams
also read the store every second for those."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict


class EventHub:
    """Wakes whoever waits on a job when it changes (this process's changes; others are polled)."""

    def __init__(self) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, job_id: str) -> None:
        for event in self._events.get(job_id, ()):
            event.set()

    async def wait(self, job_id: str, timeout: float) -> None:
        """Until the job changes, or ``timeout`` seconds."""
        event = asyncio.Event()
        self._events[job_id].add(event)
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            self._events[job_id].discard(event)
            if not self._events[job_id]:
                del self._events[job_id]
