"""One worker per device, fed by a bounded queue, batching concurrent requests through the pipeline.

Every model computation of a device (detection, background and head generators, warps) runs on
that device's single worker thread, so concurrent requests never oversubscribe the CPU cores or
interleave GPU work; what runs elsewhere (decode, encode, HTTP) does not touch the models.

The worker takes the oldest waiting ticket, then gathers more for up to ``batch_wait`` seconds or
until ``max_batch`` tickets, and hands each style's tickets to :meth:`Cartoonizer.run_many`, which
batches head crops across all of them and background passes across images of the same size.

Admission happens before a request decodes anything (:meth:`Scheduler.admit`): it asks for room
for its images by their cost, the pixels the models will run on. It is refused at once, with
:class:`QueueFullError` and a ``retry_after``, when ``queue_size`` images already wait (or are
admitted and decoding), or when the work ahead of it plus its own, at the measured seconds per
processing pixel, would not be done before its deadline: a request that would time out is told so
at once instead of holding memory and a queue slot until it does. A ticket whose deadline passes
(:meth:`Ticket.expire`), or whose client went away (:meth:`Ticket.cancel`), is dropped from the
queue, or stops between stages if already running; its future gets :class:`DeadlineExceededError`
or :class:`~inference.pipeline.CancelledError`, counted apart (``deadline`` vs ``cancelled``).

Background work (job items, ``submit(background=True)``) waits in its own queue, is taken only when
no interactive ticket waits, and is neither counted against ``queue_size`` nor refused. It also
waits ``interactive_grace`` seconds after interactive work was admitted or finished: a client that
was just served often sends its next photo at once, and an admitted image is still decoding; a job
item started in that moment would make that request wait for the whole item (background work cannot
be interrupted). The grace costs a job at most that long per interactive request, and holds a waiting
job item back for at most ``GRACE_AT_MOST`` interactive batches in a row: a client that sends photos
back to back would otherwise starve jobs for as long as it keeps sending.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final

import numpy as np
from torch import Tensor

from inference.errors import ToonserveError
from inference.models import StyleNotLoadedError
from inference.pipeline import CancelledError, Cartoonizer, NoFaceError, Options, Result

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 32
DEFAULT_BATCH_WAIT_S: Final = 0.005
#: Background work waits this long after interactive work was admitted or finished (see above).
DEFAULT_INTERACTIVE_GRACE_S: Final = 0.05
#: Interactive batches in a row for which the grace holds a waiting job item back; then the item goes
#: (before the next interactive request only if that one is not queued yet: queued ones always go first).
GRACE_AT_MOST: Final = 4
#: Starting estimate of the time per image, before anything was measured (seconds).
_INITIAL_SERVICE_S: Final = 1.0
#: Starting estimate of the time per processing pixel (seconds): 1 s per million, about what a
#: float32 pass takes on two CPU cores; replaced by measurements after the first batch.
_INITIAL_SECONDS_PER_PIXEL: Final = 1e-6
#: Deadline checks count the work ahead and the newcomer's own this many times over: per-pixel cost
#: varies with the photo (faces, aspect ratio) and with what else runs on the cores, and a 503 now
#: serves a client better than a 504 a minute from now.
_ESTIMATE_MARGIN: Final = 1.5
#: Weight of the newest measurement in the moving averages.
_EMA_WEIGHT: Final = 0.2


class QueueFullError(ToonserveError):
    """Too many requests are waiting; ``retry_after`` (seconds) says when to come back."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after: int = retry_after


class DeadlineExceededError(ToonserveError):
    """The request's deadline passed before its image was finished."""


class SchedulerClosedError(ToonserveError):
    """The scheduler is shutting down and takes no new work."""


@dataclass(eq=False)
class Admission:
    """Room held for images a request is decoding, to be submitted with it (or released)."""

    #: Processing pixels of each image not submitted yet.
    pixels: list[int]
    deadline: float


@dataclass(eq=False)
class Ticket:
    """One image waiting for, or going through, the worker."""

    style: str
    #: (H, W, 3) uint8 RGB: a host array, or a tensor already on the device (GPU decode).
    image: np.ndarray | Tensor
    options: Options
    deadline: float  # time.monotonic() seconds
    future: Future[Result] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _expired: threading.Event = field(default_factory=threading.Event)

    @property
    def pixels(self) -> int:
        """Its cost: the processing pixels the models will run on."""
        size = self.options.input_size or (int(self.image.shape[0]), int(self.image.shape[1]))
        return int(np.prod(self.options.processing_shape(size)))

    def cancel(self) -> None:
        """The client is gone: drop the work (now if queued, between stages if running)."""
        self._cancelled.set()

    def expire(self) -> None:
        """Its waiter gave up at the deadline: drop the work, counted as ``deadline``."""
        self._expired.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self._expired.is_set() or (now if now is not None else time.monotonic()) >= self.deadline

    @property
    def queue_wait_ms(self) -> float:
        end = self.started if self.started is not None else time.monotonic()
        return (end - self.enqueued) * 1000


class Scheduler:
    """The worker of one device. ``cartoonizers`` maps a style name to its pipeline on that device."""

    def __init__(
        self,
        cartoonizers: dict[str, Cartoonizer],
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_batch: int = 4,
        batch_wait: float = DEFAULT_BATCH_WAIT_S,
        name: str = "cpu",
        on_outcome: Callable[[str], None] | None = None,
        interactive_grace: float = DEFAULT_INTERACTIVE_GRACE_S,
    ) -> None:
        if queue_size < 1 or max_batch < 1 or batch_wait < 0 or interactive_grace < 0:
            raise ValueError("queue_size and max_batch must be >= 1, batch_wait and interactive_grace >= 0")
        self.cartoonizers = cartoonizers
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.interactive_grace = interactive_grace
        #: Background work is not started before this (time.monotonic()): interactive work was just
        #: admitted or finished.
        self._background_after = 0.0
        #: Interactive batches finished while background work waited, since background work last ran.
        self._passed_over = 0
        self.name = name
        #: Told how each ticket ended: ok, no_face, cancelled, deadline, rejected (queue full), error.
        self._on_outcome = on_outcome or (lambda _: None)
        self._queue: deque[Ticket] = deque()
        #: Background work (job items): taken only when no interactive ticket waits, never counted
        #: against ``queue_size`` (its producer bounds how many it keeps here).
        self._background: deque[Ticket] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        self._service_s = _INITIAL_SERVICE_S
        self._seconds_per_pixel = _INITIAL_SECONDS_PER_PIXEL
        #: Admitted images still decoding: their count and pixels (they hold queue room).
        self._reserved = 0
        self._reserved_px = 0
        #: Pixels of the interactive tickets waiting, and of the batch being processed.
        self._queued_px = 0
        self._running_px = 0
        self._running_since = 0.0
        self._running_interactive = False
        #: Batches processed so far (to notice that work happened since some moment).
        self.batches_done = 0
        self._thread = threading.Thread(target=self._loop, name=f"toonserve-worker-{name}", daemon=True)

    # -- client side -------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Interactive tickets waiting (not yet started)."""
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing waits, nothing runs."""
        return not (self._queue or self._background or self._running or self._reserved)

    @property
    def background_depth(self) -> int:
        """Background tickets waiting (not yet started)."""
        return len(self._background)

    @property
    def in_flight(self) -> int:
        """Tickets waiting or being processed."""
        return len(self._queue) + self._running

    @property
    def seconds_per_image(self) -> float:
        """Moving average of the worker's time per image (batch time / batch size)."""
        return self._service_s

    @property
    def seconds_per_pixel(self) -> float:
        """Moving average of the worker's time per processing pixel (batch time / batch pixels)."""
        return self._seconds_per_pixel

    def _work_ahead_s(self, now: float) -> float:
        """Seconds of interactive work ahead of a newcomer: what waits or is admitted, and what is
        left of the running batch (background work included: it cannot be interrupted)."""
        left = max(0.0, self._running_px * self._seconds_per_pixel - (now - self._running_since))
        return (self._queued_px + self._reserved_px) * self._seconds_per_pixel + left

    def retry_after(self) -> int:
        """Seconds until the work ahead is likely done, at least 1."""
        with self._cond:
            return max(1, math.ceil(self._work_ahead_s(time.monotonic())))

    def admit(self, pixels: list[int], deadline: float) -> Admission:
        """Hold room for images about to be decoded and submitted (each costs its processing pixels).

        Refused at once with :class:`QueueFullError` when the queue has no room for all of them, or
        when the work ahead plus theirs would not be done by ``deadline``. Release what is not
        submitted with :meth:`release`.
        """
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the service is shutting down")
            waiting = len(self._queue) + self._reserved
            ahead = self._work_ahead_s(now)
            wait = max(1, math.ceil(ahead))
            if waiting + len(pixels) > self.queue_size:
                self._reject(len(pixels))
                free = max(0, self.queue_size - waiting)
                what = f"{len(pixels)} images do" if len(pixels) > 1 else "the image does"
                raise QueueFullError(
                    f"{what} not fit the queue on {self.name} ({waiting} waiting, {free} free of "
                    f"{self.queue_size}); retry in about {wait} s",
                    wait,
                )
            own = sum(pixels) * self._seconds_per_pixel
            if now + _ESTIMATE_MARGIN * (ahead + own) > deadline:
                self._reject(len(pixels))
                left = deadline - now
                raise QueueFullError(
                    f"the service is too busy to finish this before its deadline: about {ahead:.0f} s of "
                    f"work is ahead of it and it needs about {own:.1f} s more, with {left:.0f} s left; "
                    f"retry in about {wait} s",
                    wait,
                )
            self._reserved += len(pixels)
            self._reserved_px += sum(pixels)
            self._background_after = max(self._background_after, now + self.interactive_grace)
            return Admission(list(pixels), deadline)

    def release(self, admission: Admission) -> None:
        """Give back the room of the admitted images that were not submitted (decode failed, …)."""
        with self._cond:
            self._reserved -= len(admission.pixels)
            self._reserved_px -= sum(admission.pixels)
            admission.pixels.clear()

    def _reject(self, count: int) -> None:
        for _ in range(count):
            self._on_outcome("rejected")

    def add(self, style: str, cartoonizer: Cartoonizer) -> None:
        """Serve ``style`` from now on (a style that finished loading after the worker started)."""
        with self._cond:
            # Copy on write: the worker reads the dict without the lock.
            self.cartoonizers = {**self.cartoonizers, style: cartoonizer}

    def submit(
        self,
        style: str,
        image: np.ndarray | Tensor,
        options: Options,
        deadline: float,
        background: bool = False,
        admission: Admission | None = None,
    ) -> Ticket:
        """Queue one image. Raises :class:`QueueFullError` or :class:`SchedulerClosedError` at once.

        With an ``admission`` (from :meth:`admit`) the image takes the room held for it. Without one
        it is admitted here, by count only. ``background`` work (job items) waits in its own queue,
        is taken only when no interactive ticket waits, and never fills the interactive queue.
        """
        if style not in self.cartoonizers:
            raise StyleNotLoadedError(f"style {style!r} is not loaded on {self.name}")
        ticket = Ticket(style, image, options, deadline)
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the service is shutting down")
            if background:
                self._background.append(ticket)
                self._cond.notify()
                return ticket
            if admission is not None and admission.pixels:
                self._reserved -= 1
                pixels = admission.pixels.pop(0)
                self._reserved_px -= pixels
                # Decoding took its time: if what is ahead now cannot be done by the deadline, say so
                # at once rather than let the image wait to time out.
                now = time.monotonic()
                ahead = self._work_ahead_s(now)
                if now + _ESTIMATE_MARGIN * (ahead + ticket.pixels * self._seconds_per_pixel) > deadline:
                    self._reject(1)
                    wait = max(1, math.ceil(ahead))
                    raise QueueFullError(
                        f"the service is too busy to finish this before its deadline: about {ahead:.0f} s "
                        f"of work is ahead of it; retry in about {wait} s",
                        wait,
                    )
            elif len(self._queue) + self._reserved >= self.queue_size:
                self._reject(1)
                wait = max(1, math.ceil(self._work_ahead_s(time.monotonic())))
                raise QueueFullError(
                    f"{len(self._queue)} images are already waiting on {self.name} (queue size "
                    f"{self.queue_size}); retry in about {wait} s",
                    wait,
                )
            self._queue.append(ticket)
            self._queued_px += ticket.pixels
            self._cond.notify()
        return ticket

    def discard(self, ticket: Ticket) -> None:
        """Take a ticket whose waiter gave up out of the queue now (its room is free at once); a
        running one stops between stages."""
        with self._cond:
            if ticket in self._queue:
                self._queue.remove(ticket)
                self._queued_px -= ticket.pixels
                self._finish(ticket, self._gone(ticket))

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with ``drain``, finish what was accepted first (graceful shutdown)."""
        with self._cond:
            self._closed = True
            if not drain:
                for queue in (self._queue, self._background):
                    while queue:
                        queue.popleft().future.set_exception(
                            SchedulerClosedError("the service is shutting down")
                        )
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- worker side -------------------------------------------------------------------------------

    def _take_batch(self) -> list[Ticket] | None:
        """Block for the next tickets; None when closed and drained."""
        with self._cond:
            while not self._queue:
                if self._background:
                    if self._closed or self._passed_over >= GRACE_AT_MOST:
                        break
                    hold = self._background_after - time.monotonic()
                    if hold <= 0:
                        break
                    self._cond.wait(hold)  # interactive work may be on its way (see the module)
                    continue
                if self._closed:
                    return None
                self._cond.wait()
            # Interactive first; a batch is gathered from one queue only.
            interactive = bool(self._queue)
            source = self._queue if interactive else self._background
            batch = [source.popleft()]
            gather_until = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                if source:
                    batch.append(source.popleft())
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._running = len(batch)
            self._running_interactive = interactive
            if not interactive:
                self._passed_over = 0
            pixels = sum(t.pixels for t in batch)
            if interactive:
                self._queued_px -= pixels
            self._running_px = pixels
            self._running_since = time.monotonic()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            try:
                self._process(batch)
            except Exception as exc:  # a bug must not kill the worker: fail this batch, keep serving
                log.exception("worker %s: batch failed", self.name)
                for t in batch:
                    if not t.future.done():
                        self._finish(t, exc)
            finally:
                with self._cond:
                    self._running = 0
                    self._running_px = 0
                    self.batches_done += 1
                    if self._running_interactive:
                        self._background_after = time.monotonic() + self.interactive_grace
                        if self._background:
                            self._passed_over += 1

    def _process(self, batch: list[Ticket]) -> None:
        now = time.monotonic()
        live: list[Ticket] = []
        for t in batch:
            t.started = now
            if t.cancelled or t.expired(now):
                self._finish(t, self._gone(t))
            else:
                live.append(t)
        if not live:
            return
        start = time.perf_counter()
        by_style: dict[str, list[Ticket]] = {}
        for t in live:
            by_style.setdefault(t.style, []).append(t)
        for style, tickets in by_style.items():
            outcomes = self.cartoonizers[style].run_many(
                [(t.image, t.options) for t in tickets],
                alive=lambda i, tickets=tickets: not (tickets[i].cancelled or tickets[i].expired()),  # type: ignore[misc]
            )
            for t, outcome in zip(tickets, outcomes, strict=True):
                if isinstance(outcome, CancelledError) and t.expired() and not t.cancelled:
                    outcome = DeadlineExceededError("deadline passed while the image was being processed")
                self._finish(t, outcome)
        elapsed = time.perf_counter() - start
        per_image = elapsed / len(live)
        per_pixel = elapsed / max(1, sum(t.pixels for t in live))
        with self._cond:
            self._service_s = (1 - _EMA_WEIGHT) * self._service_s + _EMA_WEIGHT * per_image
            self._seconds_per_pixel = (1 - _EMA_WEIGHT) * self._seconds_per_pixel + _EMA_WEIGHT * per_pixel

    @staticmethod
    def _gone(ticket: Ticket) -> ToonserveError:
        """Why a ticket is dropped before it runs: its client went away, or its deadline passed."""
        if ticket.cancelled:
            return CancelledError("the client went away before processing started")
        return DeadlineExceededError(f"deadline passed after {ticket.queue_wait_ms:.0f} ms in the queue")

    def _finish(self, ticket: Ticket, outcome: Result | BaseException) -> None:
        if isinstance(outcome, Result):
            ticket.future.set_result(outcome)
            self._on_outcome("ok" if outcome.no_face is None else "no_face")
            return
        ticket.future.set_exception(outcome)
        if isinstance(outcome, CancelledError):
            self._on_outcome("cancelled")
        elif isinstance(outcome, DeadlineExceededError):
            self._on_outcome("deadline")
        elif isinstance(outcome, NoFaceError):
            self._on_outcome("no_face")
        else:
            self._on_outcome("error")
