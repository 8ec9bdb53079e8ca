"""The job runner: takes items from the store and puts them through the one request flow.

Items go to the engine's worker as *background* work: the worker takes them only when no
interactive request waits, and they never count against the interactive queue. At most
``concurrency`` items are in flight (decoding, waiting, encoding), enough to keep the worker busy
and let the items of one job share its batches, few enough that a 200-photo job holds no memory it
does not need.

Besides running items, the runner:

* at start-up, hands items a dead process left ``running`` back to the queue (``store.recover``) and
  resumes webhooks that were not delivered;
* fails jobs whose style is not configured on this server (they could never run);
* cancels a running item when its job is cancelled (it stops between pipeline stages);
* deletes ended jobs once they expire, with their files;
* delivers each ended job's webhook;
* tells listeners (:class:`EventHub`) whenever a job changes, for the events stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from typing import Final

from inference.engine import Engine
from inference.errors import StyleUnavailableError, ToonserveError
from inference.flow import Flow
from inference.pipeline import CancelledError, Result
from inference.scheduler import Ticket
from jobs.model import Job
from jobs.store import Claim, JobStore
from jobs.webhooks import WebhookSender

log = logging.getLogger(__name__)

#: How often a runner looks for work when it was not woken, and how often a waiting item checks
#: whether its job was cancelled elsewhere (another replica).
POLL_S: Final = 1.0


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


class JobRunner:
    """Runs the stored jobs' items through ``flow`` (module docstring). Start and stop it from the
    event loop that serves the app."""

    def __init__(
        self,
        store: JobStore,
        engine: Engine,
        flow: Flow,
        webhooks: WebhookSender,
        *,
        concurrency: int,
        ttl_s: float,
        hub: EventHub | None = None,
        on_item: Callable[[str], None] | None = None,
        error_code: Callable[[ToonserveError], str] | None = None,
    ) -> None:
        """``error_code(exc)``: the code an item that failed with ``exc`` reports (the service passes
        the HTTP API's, so an item's error reads like the same photo's error from /cartoonize)."""
        self.store = store
        self.engine = engine
        self.flow = flow
        self.webhooks = webhooks
        self.concurrency = concurrency
        self.ttl_s = ttl_s
        self.hub = hub or EventHub()
        self.owner = uuid.uuid4().hex
        self._on_item = on_item or (lambda _: None)
        self._error_code = error_code or (lambda exc: type(exc).__name__)
        self._wake = asyncio.Event()
        self._stopping = False
        self._slots = asyncio.Semaphore(concurrency)
        self._items: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._tickets: dict[str, set[Ticket]] = defaultdict(set)
        self._webhook_tasks: dict[str, asyncio.Task[None]] = {}

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        requeued = await asyncio.to_thread(self.store.recover)
        if requeued:
            log.info("jobs: %d item(s) left running by an earlier process are queued again", requeued)
        for job in await asyncio.to_thread(self.store.pending_webhooks):
            self._send_webhook(job)
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="toonserve-jobs"),
            asyncio.create_task(self._sweep_loop(), name="toonserve-jobs-expiry"),
        ]

    async def stop(self, timeout: float) -> None:
        """Take no more items; let those in flight finish for up to ``timeout`` seconds. Whatever is
        still running then stays ``running`` in the store and is queued again at the next start."""
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._items:
            await asyncio.wait(self._items, timeout=timeout)
        for task in [*self._items, *self._webhook_tasks.values()]:
            task.cancel()
        await asyncio.gather(
            *self._tasks, *self._items, *self._webhook_tasks.values(), return_exceptions=True
        )

    def wake(self) -> None:
        """New work was stored."""
        self._wake.set()

    def cancel_running(self, job_id: str) -> None:
        """Stop this process's in-flight items of ``job_id`` (between pipeline stages)."""
        for ticket in self._tickets.get(job_id, ()):
            ticket.cancel()

    def changed(self, job: Job | None, job_id: str) -> None:
        """A job changed: wake its listeners; if it just ended, send its webhook."""
        self.hub.notify(job_id)
        if job is not None and job.terminal and job.webhook_state == "pending":
            self._send_webhook(job)

    # -- the loops ---------------------------------------------------------------------------------

    def _servable(self) -> set[str]:
        return {name for name, status in self.engine.status().items() if status.state == "loaded"}

    async def _fail_unconfigured(self) -> None:
        configured = set(self.engine.styles)
        for style in await asyncio.to_thread(self.store.active_styles):
            if style in configured:
                continue
            for job_id in await asyncio.to_thread(self.store.jobs_of_style, style):
                names = ", ".join(sorted(configured))
                message = f"style {style!r} is not configured on this server (configured: {names})"
                job = await asyncio.to_thread(self.store.fail, job_id, message, self.ttl_s)
                log.warning("job %s failed: %s", job_id, message)
                self.changed(job, job_id)

    async def _claim_loop(self) -> None:
        await self._fail_unconfigured()
        while not self._stopping:
            await self._slots.acquire()
            claim = None
            try:
                claim = await asyncio.to_thread(self.store.claim, self._servable(), self.owner)
            finally:
                if claim is None:
                    self._slots.release()
            if claim is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)
                await self._fail_unconfigured()
                continue
            task = asyncio.create_task(self._run(claim), name=f"toonserve-job-{claim.job_id}-{claim.index}")
            self._items.add(task)
            task.add_done_callback(self._item_done)

    def _item_done(self, task: asyncio.Task[None]) -> None:
        self._items.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job item failed unexpectedly", exc_info=task.exception())

    async def _sweep_loop(self) -> None:
        interval = min(60.0, max(0.5, self.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            for job_id in await asyncio.to_thread(self.store.expired, time.time()):
                await asyncio.to_thread(self.store.delete, job_id)
                log.info("job %s expired and was deleted", job_id)
                self.hub.notify(job_id)

    # -- one item ----------------------------------------------------------------------------------

    async def _run(self, claim: Claim) -> None:
        job: Job | None
        try:
            params = claim.options.params(self.flow)
        except StyleUnavailableError:
            # Its style went away meanwhile (a reload): the item waits for it again.
            await asyncio.to_thread(self.store.release, claim)
            return
        except ToonserveError as exc:
            job = await asyncio.to_thread(self.store.fail, claim.job_id, str(exc), self.ttl_s)
            self.changed(job, claim.job_id)
            return
        try:
            data = await asyncio.to_thread(claim.input_path.read_bytes)
            decoded = await self.flow.decode(data, params)
            ticket = self.flow.submit(params, decoded, math.inf, background=True)
            self._tickets[claim.job_id].add(ticket)
            try:
                result = await self._wait(claim, ticket)
            finally:
                self._tickets[claim.job_id].discard(ticket)
                if not self._tickets[claim.job_id]:
                    del self._tickets[claim.job_id]
            outcome = await self.flow.finish(result, params, decoded, ticket)
        except CancelledError:
            job = await asyncio.to_thread(self.store.finish, claim, "cancelled", ttl_s=self.ttl_s)
            self._on_item("cancelled")
        except asyncio.CancelledError:
            raise  # shutting down: the item stays running in the store and is queued again at start
        except ToonserveError as exc:
            error = {"code": self._error_code(exc), "message": str(exc)}
            job = await asyncio.to_thread(self.store.finish, claim, "error", error=error, ttl_s=self.ttl_s)
            self._on_item("error")
        except OSError as exc:
            job = await asyncio.to_thread(
                self.store.finish,
                claim,
                "error",
                error={"code": "internal_error", "message": f"the job's photo cannot be read: {exc}"},
                ttl_s=self.ttl_s,
            )
            self._on_item("error")
        else:
            job = await asyncio.to_thread(
                self.store.finish,
                claim,
                "ok",
                result=outcome.data,
                faces_stylized=outcome.result.faces_stylized,
                timings_ms=outcome.timings_ms,
                ttl_s=self.ttl_s,
            )
            self._on_item("ok")
        self.changed(job, claim.job_id)

    async def _wait(self, claim: Claim, ticket: Ticket) -> Result:
        """The ticket's result; cancels it when the job is cancelled here or in another process."""
        waiting = asyncio.ensure_future(self.flow.wait(ticket))
        while True:
            done, _ = await asyncio.wait({waiting}, timeout=POLL_S)
            if done:
                return waiting.result()
            job = await asyncio.to_thread(self.store.get, claim.job_id)
            gone = job is None or job.status == "cancelled"
            if gone or not await asyncio.to_thread(self.store.renew, claim):
                ticket.cancel()

    def _send_webhook(self, job: Job) -> None:
        if job.id in self._webhook_tasks or job.webhook is None:
            return

        async def send() -> None:
            try:
                delivered = await self.webhooks.deliver(job)
                await asyncio.to_thread(
                    self.store.set_webhook_state, job.id, "delivered" if delivered else "failed"
                )
            except asyncio.CancelledError:
                raise  # shutting down: still pending, resumed at the next start
            except Exception:
                log.exception("webhook of job %s could not be sent", job.id)
                await asyncio.to_thread(self.store.set_webhook_state, job.id, "failed")
            finally:
                self._webhook_tasks.pop(job.id, None)

        self._webhook_tasks[job.id] = asyncio.create_task(send(), name=f"toonserve-webhook-{job.id}")
