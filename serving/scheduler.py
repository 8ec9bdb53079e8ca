"""One worker per device, fed by bounded queues, batching concurrent requests through the pipeline.

Every model computation of a device (detection, background and head generators, warps) runs on
that device's single worker thread, so concurrent requests never oversubscribe the CPU cores or
interleave GPU work; what runs elsewhere (decode, encode, HTTP) does not touch the models.

**Fair shares.** Every ticket belongs to a :class:`Client`. Waiting tickets stand in one line per
client (:class:`~serving.fair_queue.FairQueue`, start-time fair queuing by estimated seconds), so
the worker serves clients in turn: a client that floods the service pushes only its own images
back, and another client's photo waits for at most the work already running plus one image of each
client ahead of it, whatever is queued. The worker takes the first ticket in that order, then
gathers more for up to ``batch_wait`` seconds or until ``max_batch`` tickets, and hands each style's
tickets to :meth:`Cartoonizer.run_many`, which batches head crops across all of them and background
passes across images of the same size.

**Admission** happens before a request decodes anything (:meth:`Scheduler.admit`): it asks for
places in its client's line for its images, each costing what :class:`~serving.cost.CostModel`
estimates from its cost pixels (:func:`~serving.cost.cost_pixels`). It is refused at once with
:class:`QueueFullError` and a ``retry_after`` when ``queue_size`` images of all clients already
wait (or are admitted and decoding), with :class:`ClientQueueFullError` when its own client's
``max_queued`` would be exceeded, and with :class:`QueueFullError` when the work that would be
served before its last image, plus its own, would not be done before its deadline: a request that
would time out is told so at once instead of holding memory and a queue slot until it does. An idle
worker never refuses for lack of time: with nothing ahead, the image runs, and its deadline is
enforced while it runs. A ticket whose deadline passes (:meth:`Ticket.expire`), or whose client went
away (:meth:`Ticket.cancel`), is dropped from the queue, or stops between stages if already running;
its future gets :class:`DeadlineExceededError` or :class:`~inference.pipeline.CancelledError`,
counted apart (``deadline`` vs ``cancelled``).

Background work (job items, ``submit(background=True)``) has lines of its own, shared between
clients the same way; it is taken only when no interactive ticket waits, and is neither counted
against ``queue_size`` nor refused. It also waits ``interactive_grace`` seconds after interactive
work was admitted or finished: a client that was just served often sends its next photo at once, and
an admitted image is still decoding; a job item started in that moment would make that request wait
for the whole item (background work cannot be interrupted). The grace costs a job at most that long
per interactive request, and holds a waiting job item back for at most ``GRACE_AT_MOST`` interactive
batches in a row: a client that sends photos back to back would otherwise starve jobs for as long as
it keeps sending.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Final

import numpy as np
from torch import Tensor

from inference.errors import ToonserveError
from inference.models import StyleNotLoadedError
from inference.pipeline import AbandonedError, Cartoonizer, NoFaceError, Options, Result
from serving.cost import CostModel
from serving.fair_queue import FairQueue, Slot
from serving.tickets import (
    Admission,
    Client,
    ClientQueueFullError,
    DeadlineExceededError,
    QueueFullError,
    SchedulerClosedError,
    Ticket,
)

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE: Final = 32
DEFAULT_BATCH_WAIT_S: Final = 0.005
#: Background work waits this long after interactive work was admitted or finished (see above).
DEFAULT_INTERACTIVE_GRACE_S: Final = 0.05
#: Interactive batches in a row for which the grace holds a waiting job item back; then the item goes
#: (before the next interactive request only if that one is not queued yet: queued ones always go first).
GRACE_AT_MOST: Final = 4
#: Deadline checks count the work ahead and the newcomer's own this many times over: cost varies
#: with the photo (faces, aspect ratio) and with what else runs on the cores, and a 503 now serves a
#: client better than a 504 a minute from now.
_ESTIMATE_MARGIN: Final = 1.5


def default_client_queue_size(queue_size: int) -> int:
    """Images one client may have waiting or admitted at once, by default: half the queue, so that
    one client never fills it for everyone."""
    return max(1, queue_size // 2)


class Scheduler:
    """The worker of one device. ``cartoonizers`` maps a style name to its pipeline on that device.

    ``on_outcome(outcome, client_name)`` is told how each ticket ended: ok, no_face, cancelled,
    deadline, rejected (refused at admission), error.
    """

    def __init__(
        self,
        cartoonizers: dict[str, Cartoonizer],
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_batch: int = 4,
        batch_wait: float = DEFAULT_BATCH_WAIT_S,
        name: str = "cpu",
        on_outcome: Callable[[str, str], None] | None = None,
        interactive_grace: float = DEFAULT_INTERACTIVE_GRACE_S,
        cost: CostModel | None = None,
    ) -> None:
        if queue_size < 1 or max_batch < 1 or batch_wait < 0 or interactive_grace < 0:
            raise ValueError("queue_size and max_batch must be >= 1, batch_wait and interactive_grace >= 0")
        self.cartoonizers = cartoonizers
        self.queue_size = queue_size
        self.max_batch = max_batch
        self.batch_wait = batch_wait
        self.interactive_grace = interactive_grace
        #: What an image costs the worker, learnt from what it ran.
        self.cost = cost or CostModel()
        #: Background work is not started before this (time.monotonic()): interactive work was just
        #: admitted or finished.
        self._background_after = 0.0
        #: Interactive batches that started while background work waited, since background work last
        #: ran (one that started before the work came did not hold it back).
        self._passed_over = 0
        self.name = name
        self._on_outcome = on_outcome or (lambda _outcome, _client: None)
        self._queue: FairQueue[Ticket] = FairQueue()
        #: Background work (job items): taken only when no interactive ticket waits, never counted
        #: against ``queue_size`` (its producer bounds how many it keeps here).
        self._background: FairQueue[Ticket] = FairQueue()
        self._cond = threading.Condition()
        self._closed = False
        self._running = 0
        #: Estimated seconds of the batch being processed, and when it started.
        self._running_cost_s = 0.0
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
        return not (self._queue or self._background or self._running or self._queue.held)

    @property
    def background_depth(self) -> int:
        """Background tickets waiting (not yet started)."""
        return len(self._background)

    @property
    def in_flight(self) -> int:
        """Tickets waiting or being processed."""
        return len(self._queue) + self._running

    def _running_left_s(self, now: float) -> float:
        """Estimated seconds left of the batch being processed (background work included: it cannot
        be interrupted)."""
        if not self._running:
            return 0.0
        return max(0.0, self._running_cost_s - (now - self._running_since))

    def _work_ahead_s(self, now: float) -> float:
        """Estimated seconds of all interactive work: what waits or is admitted, and what is left of
        the running batch."""
        return self._queue.cost_s + self._running_left_s(now)

    def retry_after(self) -> int:
        """Seconds until the work ahead is likely done, at least 1."""
        with self._cond:
            return max(1, math.ceil(self._work_ahead_s(time.monotonic())))

    def _refuse_room(self, count: int, client: Client, now: float) -> None:
        """Raise if ``count`` more images of ``client`` do not fit: the whole queue, then its share."""
        waiting = len(self._queue) + self._queue.held
        if waiting + count > self.queue_size:
            self._reject(count, client)
            wait = max(1, math.ceil(self._work_ahead_s(now)))
            free = max(0, self.queue_size - waiting)
            what = f"{count} images do" if count > 1 else "the image does"
            raise QueueFullError(
                f"{what} not fit the queue on {self.name} ({waiting} waiting, {free} free of "
                f"{self.queue_size}); retry in about {wait} s",
                wait,
            )
        limit = client.max_queued
        held = self._queue.places(client.key)
        if limit is not None and held + count > limit:
            self._reject(count, client)
            wait = max(1, math.ceil(self._client_wait_s(client, now)))
            what = f"{count} more images" if count > 1 else "another image"
            raise ClientQueueFullError(
                f"this client already has {held} images waiting and may have at most {limit}; "
                f"{what} would exceed that. Retry in about {wait} s",
                wait,
                limit,
            )

    def _client_wait_s(self, client: Client, now: float) -> float:
        """Estimated seconds until ``client``'s places are served: the work before its last place."""
        last = self._queue.last(client.key)
        return self._running_left_s(now) + (self._queue.ahead(last) if last is not None else 0.0)

    def _late(self, slot: Slot[Ticket], now: float, deadline: float) -> tuple[bool, float]:
        """Whether the work served no later than ``slot`` (its own included) cannot be done by
        ``deadline``, and the seconds ahead of it. Never late with nothing ahead: an image that is
        next runs, and its deadline is enforced while it runs."""
        ahead = self._queue.ahead(slot) - slot.cost_s + self._running_left_s(now)
        if ahead <= 0:
            return False, 0.0
        return now + _ESTIMATE_MARGIN * (ahead + slot.cost_s) > deadline, ahead

    def admit(self, pixels: list[int], deadline: float, client: Client | None = None) -> Admission:
        """Hold places in ``client``'s line for images about to be decoded and submitted, each costing
        its cost pixels (:func:`~serving.cost.cost_pixels`).

        Refused at once with :class:`QueueFullError` when the queue has no room for all of them, or
        when the work ahead plus theirs would not be done by ``deadline``; with
        :class:`ClientQueueFullError` when the client's own limit would be exceeded. Release what is
        not submitted with :meth:`release`.
        """
        client = client or Client()
        now = time.monotonic()
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the service is shutting down")
            self._refuse_room(len(pixels), client, now)
            slots = [self._queue.hold(client.key, self.cost.seconds(p)) for p in pixels]
            if slots:
                late, ahead = self._late(slots[-1], now, deadline)
                if late:
                    for slot in slots:
                        self._queue.drop(slot)
                    self._reject(len(pixels), client)
                    own = sum(s.cost_s for s in slots)
                    wait = max(1, math.ceil(ahead))
                    raise QueueFullError(
                        f"the service is too busy to finish this before its deadline: about {ahead:.0f} s "
                        f"of work is ahead of it and it needs about {own:.1f} s more, with "
                        f"{deadline - now:.0f} s left; retry in about {wait} s",
                        wait,
                    )
            self._background_after = max(self._background_after, now + self.interactive_grace)
            return Admission(slots, deadline, client)

    def release(self, admission: Admission) -> None:
        """Give back the places of the admitted images that were not submitted (decode failed, …)."""
        with self._cond:
            for slot in admission.slots:
                self._queue.drop(slot)
            admission.slots.clear()

    def _reject(self, count: int, client: Client) -> None:
        for _ in range(count):
            self._on_outcome("rejected", client.name)

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
        client: Client | None = None,
    ) -> Ticket:
        """Queue one image. Raises :class:`QueueFullError` or :class:`SchedulerClosedError` at once.

        With an ``admission`` (from :meth:`admit`) the image takes the place held for it, for the
        admission's client. Without one it is admitted here, by count only, for ``client``.
        ``background`` work (job items) waits in its own lines, is taken only when no interactive
        ticket waits, and never fills the interactive queue.
        """
        if style not in self.cartoonizers:
            raise StyleNotLoadedError(f"style {style!r} is not loaded on {self.name}")
        client = admission.client if admission is not None else (client or Client())
        ticket = Ticket(style, image, options, deadline, client)
        with self._cond:
            if self._closed:
                raise SchedulerClosedError("the service is shutting down")
            now = time.monotonic()
            if background:
                ticket.cost_s = self.cost.seconds(ticket.pixels)
                self._background.push(client.key, ticket.cost_s, ticket)
                self._cond.notify()
                return ticket
            if admission is not None and admission.slots:
                slot = admission.slots.pop(0)
                # The place was priced from the header; the decoded image may differ (EXIF turns).
                ticket.cost_s = slot.cost_s
                # Decoding took its time: if what is ahead now cannot be done by the deadline, say so
                # at once rather than let the image wait to time out.
                late, ahead = self._late(slot, now, deadline)
                if late:
                    self._queue.drop(slot)
                    self._reject(1, client)
                    wait = max(1, math.ceil(ahead))
                    raise QueueFullError(
                        f"the service is too busy to finish this before its deadline: about {ahead:.0f} s "
                        f"of work is ahead of it; retry in about {wait} s",
                        wait,
                    )
                self._queue.fill(slot, ticket)
            else:
                self._refuse_room(1, client, now)
                ticket.cost_s = self.cost.seconds(ticket.pixels)
                self._queue.push(client.key, ticket.cost_s, ticket)
            self._cond.notify()
        return ticket

    def discard(self, ticket: Ticket) -> None:
        """Take a ticket whose waiter gave up out of the queue now (its room is free at once); a
        running one stops between stages."""
        with self._cond:
            slot = self._queue.find(ticket)
            if slot is not None and self._queue.drop(slot):
                self._finish(ticket, self._gone(ticket))

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with ``drain``, finish what was accepted first (graceful shutdown)."""
        with self._cond:
            self._closed = True
            if not drain:
                for queue in (self._queue, self._background):
                    for ticket in queue.drain():
                        ticket.future.set_exception(SchedulerClosedError("the service is shutting down"))
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
            # Interactive first; a batch is gathered from one queue only, in its fair order.
            interactive = bool(self._queue)
            source = self._queue if interactive else self._background
            first = source.pop()
            assert first is not None
            batch = [first]
            gather_until = time.monotonic() + self.batch_wait
            while len(batch) < self.max_batch:
                nxt = source.pop()
                if nxt is not None:
                    batch.append(nxt)
                    continue
                remaining = gather_until - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._cond.wait(remaining)
            self._running = len(batch)
            self._running_interactive = interactive
            if not interactive:
                self._passed_over = 0
            elif self._background:
                self._passed_over += 1  # this batch holds the waiting background work back
            self._running_cost_s = sum(t.cost_s for t in batch)
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
                    self._running_cost_s = 0.0
                    self.batches_done += 1
                    if self._running_interactive:
                        self._background_after = time.monotonic() + self.interactive_grace

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
        whole = True
        for style, tickets in by_style.items():
            outcomes = self.cartoonizers[style].run_many(
                [(t.image, t.options) for t in tickets],
                alive=lambda i, tickets=tickets: not (tickets[i].cancelled or tickets[i].expired()),  # type: ignore[misc]
            )
            for t, outcome in zip(tickets, outcomes, strict=True):
                if isinstance(outcome, AbandonedError) and t.expired() and not t.cancelled:
                    outcome = DeadlineExceededError("deadline passed while the image was being processed")
                whole = whole and isinstance(outcome, Result | NoFaceError)
                self._finish(t, outcome)
        # Only images that went all the way through say what an image costs (one stopped between
        # stages, or failed half way, would look cheap).
        if whole:
            self.cost.observe(len(live), sum(t.pixels for t in live), time.perf_counter() - start)

    @staticmethod
    def _gone(ticket: Ticket) -> ToonserveError:
        """Why a ticket is dropped before it runs: its client went away, or its deadline passed."""
        if ticket.cancelled:
            return AbandonedError("the client went away before processing started")
        return DeadlineExceededError(f"deadline passed after {ticket.queue_wait_ms:.0f} ms in the queue")

    def _finish(self, ticket: Ticket, outcome: Result | BaseException) -> None:
        name = ticket.client.name
        if isinstance(outcome, Result):
            ticket.future.set_result(outcome)
            self._on_outcome("ok" if outcome.no_face is None else "no_face", name)
            return
        ticket.future.set_exception(outcome)
        if isinstance(outcome, AbandonedError):
            self._on_outcome("cancelled", name)
        elif isinstance(outcome, DeadlineExceededError):
            self._on_outcome("deadline", name)
        elif isinstance(outcome, NoFaceError):
            self._on_outcome("no_face", name)
        else:
            self._on_outcome("error", name)
