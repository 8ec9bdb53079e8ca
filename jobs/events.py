"""Who follows a job: the events streams (``GET /jobs/{id}/events``) of this process, and how many there
may be.

However many streams follow a job, this process reads it from the store for all of them at once: one
:class:`_Watcher` per followed job, shared by its streams (:class:`Listener`). The watcher reads the
job once per change this process makes (:meth:`EventHub.notify`, called by the runner and the routes;
a burst of notifications is one read) and, for changes made by another replica (a shared store), once
every ``poll_s`` seconds; only while the job has listeners. Each read that differs from the last is
handed to every listener as its latest snapshot: a listener that is slow to send holds one
snapshot, never a backlog (a snapshot holds every item that ended before it, so nothing is lost by
skipping one). A stream that connects starts from the watcher's last read (or, before its first, the
first stream's own read), so a thousand streams connecting to one job read it once, not a thousand
times. The watcher stops when its last listener leaves, or once the job has settled or was deleted.

:class:`StreamSlots` counts the open streams, per client and in all, against their caps.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Final, Literal

from jobs.model import Job
from jobs.store import JobStore

log = logging.getLogger(__name__)

#: How often a followed job is read even without a change in this process (another replica's).
POLL_S: Final = 1.0


@dataclass(frozen=True)
class Snapshot:
    """The job as the watcher last read it; ``job`` None: it was deleted (or expired). Shared by all
    the job's listeners: what they make of it is made once (:meth:`memo`)."""

    job: Job | None
    _made: dict[object, bytes] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def ended(self) -> frozenset[int]:
        """The indexes of the items that had ended."""
        return frozenset(item.index for item in self.job.items if item.ended) if self.job else frozenset()

    def memo(self, key: object, make: Callable[[], bytes]) -> bytes:
        """``make()``, made once per snapshot and ``key`` for all its listeners (an event's bytes)."""
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = make()
        return made


class Listener:
    """One stream's view of its job: the latest snapshot its watcher read, handed over (not queued).
    :meth:`close` it when the stream ends."""

    def __init__(self, watcher: _Watcher) -> None:
        self.job_id = watcher.job_id
        self._watcher: _Watcher | None = watcher
        self._latest: Snapshot | None = None
        self._ready = asyncio.Event()

    def known(self) -> Snapshot | None:
        """The job as its watcher last read it, if it has yet: a state to start the stream from (every
        change since that read reaches this listener), read once for all the job's streams."""
        return self._watcher.latest if self._watcher is not None else None

    def seed(self, job: Job | None) -> Snapshot:
        """The job as the caller just read it (there was nothing :meth:`known`); kept as the watcher's
        latest read until it reads one, so the streams that connect meanwhile start from it too."""
        snapshot = Snapshot(job)
        if self._watcher is not None and self._watcher.latest is None:
            self._watcher.latest = snapshot
        return snapshot

    def close(self) -> None:
        """It listens no more (its watcher stops if it was the last); again: nothing."""
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.leave(self)

    def offer(self, snapshot: Snapshot) -> None:
        """A newer snapshot; it replaces one not taken yet."""
        self._latest = snapshot
        self._ready.set()

    async def next(self, timeout: float) -> Snapshot | None:
        """The newest snapshot not taken yet, waiting up to ``timeout`` seconds; None if none came."""
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._ready.wait()
        snapshot, self._latest = self._latest, None
        self._ready.clear()
        return snapshot


class _Watcher:
    """Reads one job for all its listeners (module docstring)."""

    def __init__(self, hub: EventHub, store: JobStore, job_id: str) -> None:
        self.hub = hub
        self.store = store
        self.job_id = job_id
        self.listeners: set[Listener] = set()
        self.changed = asyncio.Event()
        #: The last read (or a listener's own, until the first read): every change that started
        #: after it began is read again later (notified here: ``changed``; elsewhere: the poll).
        self.latest: Snapshot | None = None
        self.task = asyncio.create_task(self._run(), name=f"toonserve-events-{job_id}")

    def leave(self, listener: Listener) -> None:
        self.listeners.discard(listener)
        if not self.listeners:
            self.task.cancel()
            self.hub._retire(self)

    async def _run(self) -> None:
        failures = 0
        try:
            while True:
                if not self.changed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.hub.poll_s):
                            await self.changed.wait()
                # Every notification until now is covered by the read below; later ones set it again.
                self.changed.clear()
                try:
                    job = await asyncio.to_thread(self.store.get, self.job_id)
                except Exception as exc:  # the store is away for now (Redis): the next poll tries again
                    failures += 1
                    level = logging.WARNING if failures == 1 else logging.DEBUG
                    log.log(level, "jobs: cannot read job %s for its events streams: %s", self.job_id, exc)
                    continue
                failures = 0
                ended = job is None or job.settled
                if self.latest is not None and job == self.latest.job and not ended:
                    continue  # nothing new (a poll): the listeners are not woken
                self.latest = snapshot = Snapshot(job)
                for listener in self.listeners:
                    listener.offer(snapshot)
                if ended:
                    return  # each listener ends its stream with this snapshot
        finally:
            self.hub._retire(self)


class EventHub:
    """The watchers of this process's followed jobs (module docstring). ``store``: where they read
    jobs from (a hub without one, as a runner builds for itself, can only be notified)."""

    def __init__(self, store: JobStore | None = None, *, poll_s: float = POLL_S) -> None:
        self.store = store
        self.poll_s = poll_s
        self._watchers: dict[str, _Watcher] = {}

    def notify(self, job_id: str) -> None:
        """``job_id`` changed in this process: its watcher (if any) reads it again, soon and once."""
        watcher = self._watchers.get(job_id)
        if watcher is not None:
            watcher.changed.set()

    def listen(self, job_id: str) -> Listener:
        """A listener of ``job_id``, handed every read of the job from now on (starting the job's
        watcher if it has none) until it is closed. Read the job's state of the moment *after* this,
        so no change falls between that read and the listener's first snapshot."""
        if self.store is None:
            raise RuntimeError("this EventHub has no store to read jobs from; it can only be notified")
        watcher = self._watchers.get(job_id)
        if watcher is None:
            watcher = self._watchers[job_id] = _Watcher(self, self.store, job_id)
        listener = Listener(watcher)
        watcher.listeners.add(listener)
        return listener

    def _retire(self, watcher: _Watcher) -> None:
        if self._watchers.get(watcher.job_id) is watcher:
            del self._watchers[watcher.job_id]

    @property
    def watched(self) -> int:
        """Jobs being read for their listeners now."""
        return len(self._watchers)


Refusal = Literal["client", "total"]


class StreamSlots:
    """Open events streams per client (its fair-share key) and in all, within ``per_client`` (a
    client's own cap may replace it) and ``total``. Used from the event loop only."""

    def __init__(self, per_client: int, total: int) -> None:
        self.per_client = per_client
        self.total = total
        self._open: dict[str, int] = {}
        self._count = 0

    def take(self, key: str, limit: int | None = None) -> Refusal | None:
        """Count one more stream of ``key`` (whose cap is ``limit``, else ``per_client``): None if it
        fits, else the cap it would go over."""
        if self._open.get(key, 0) >= (limit if limit is not None else self.per_client):
            return "client"
        if self._count >= self.total:
            return "total"
        self._open[key] = self._open.get(key, 0) + 1
        self._count += 1
        return None

    def give(self, key: str) -> None:
        """A stream of ``key`` closed."""
        left = self._open.get(key, 0) - 1
        if left < 0:
            raise RuntimeError(f"no open stream of {key!r} to close")
        if left:
            self._open[key] = left
        else:
            del self._open[key]
        self._count -= 1

    def open(self, key: str | None = None) -> int:
        """Streams open now: ``key``'s, or all."""
        return self._count if key is None else self._open.get(key, 0)
