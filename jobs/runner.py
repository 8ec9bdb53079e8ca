"""The job runner: takes items from the store and puts them through the one request flow.

Items go to the engine's worker as *background* work: the worker takes them only when no
interactive request waits, and they never count against the interactive queue. At most
``concurrency`` items are in flight (decoding, waiting, encoding), enough to keep the worker busy
and let the items of one job share its batches, few enough that a 200-photo job holds no memory it
does not need.

Besides running items, the runner:

* at start-up, hands items a dead process left ``running`` back to the queue (``store.recover``; a
  shared store does it through leases instead) and resumes webhooks that were not delivered;
* fails jobs whose style is not configured on this server (they could never run);
* cancels a running item when its job is cancelled (it stops between pipeline stages);
* deletes ended jobs once they expire, with their files;
* delivers each ended job's webhook;
* tells listeners (:class:`EventHub`) whenever a job changes, for the events stream.

A video item (a chunk of a clip) goes through :class:`~serving.clips.ClipFlow` instead: its frames
(and a few before them, to warm up) are the engine's background work one by one, its finished
segments are kept in its claim's own work folder (:meth:`JobStore.claim_dir`: a later claim of the
item, after a crash, a shutdown or a lost lease, on this replica or another one that mounts the data
directory, takes the complete ones and resumes after the last of them; a runner that finds it lost its
claim removes its own folder only, the one that records the item's end all of them), its progress is
recorded at most every :data:`PROGRESS_S` (and the job's listeners told), and its result, the
chunk's frames, is moved into place when the item is recorded. The runner whose item ends the job
joins the chunks into the job's clip, with the audio (:meth:`JobStore.join_clip`; the result route
does it too if this one did not get to it).

The store may fail for a while (Redis unreachable, a full disk): the loops log it and try again with
a growing pause, an item's outcome is recorded again a few times before it is left to run again
later, and nothing of it stops the runner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

from inference.errors import ConfigurationError, StyleUnavailableError, ToonserveError
from inference.pipeline import AbandonedError
from jobs.errors import JobStoreError
from jobs.events import EventHub
from jobs.files import SEGMENTS, remove_tree
from jobs.model import VIDEO_SUFFIX, ItemStatus, Job
from jobs.store import Claim, JobStore
from jobs.webhooks import WebhookSender
from serving import tracing
from serving.clips import ClipFlow, ClipReport
from serving.engine import Engine
from serving.flow import Flow, Outcome
from serving.log_context import task_context, trace_var
from serving.options import ResolvedOptions
from serving.retry import backoff_s
from serving.tickets import Cancellable, Client
from serving.tracing import TraceContext, new_trace

log = logging.getLogger(__name__)

#: How often a runner looks for work when it was not woken, and how often a waiting item checks
#: whether its job was cancelled elsewhere (another replica).
POLL_S: Final = 1.0
#: Longest pause between attempts while the store cannot be used.
RETRY_MAX_S: Final = 30.0
#: Tries to record an item's outcome while the store cannot be used (1 s, 2 s, 4 s, 8 s apart: well
#: within a lease, so the item is not taken over meanwhile).
FINISH_ATTEMPTS: Final = 5
#: How often a video item's frame count is recorded while it runs (events report it as often).
PROGRESS_S: Final = 0.5


class _LeaseLost(Exception):
    """Another runner took the item over (this one did not renew its lease in time)."""


class _ClipGuard:
    """One watch for a whole clip (:meth:`JobRunner._watch`: the lease renewed, a cancel seen from any
    replica), where a photo has one per wait: a clip's frames each wait less than the watch's poll, so
    a watch per frame would never poll. It stands for the clip as a :class:`Cancellable`: cancelling
    it cancels the frame in flight and every later one; a lost lease fails the frame in flight (or
    the next) with :class:`_LeaseLost`."""

    def __init__(self) -> None:
        self.cancelled = False
        self._tickets: set[Cancellable] = set()
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def cancel(self) -> None:
        self.cancelled = True
        for ticket in list(self._tickets):
            ticket.cancel()

    async def watch(self, watching: Awaitable[None]) -> None:
        """Run the clip's watch; what ends it (a lost lease, or a failure of its own, which would
        leave the lease unrenewed) is handed to the frames."""
        try:
            await watching
        except Exception as exc:
            if not isinstance(exc, _LeaseLost):
                log.error("jobs: the watch of a clip failed; the clip stops: %r", exc)
            if not self._failure.done():
                self._failure.set_exception(exc)

    async def frame(self, ticket: Cancellable) -> None:
        """ClipFlow's ``watch`` of each frame: returns only by raising what the clip's watch found."""
        if self.cancelled:
            ticket.cancel()
        self._tickets.add(ticket)
        try:
            await asyncio.shield(self._failure)
        finally:
            self._tickets.discard(ticket)

    def close(self) -> None:
        if self._failure.done():
            self._failure.exception()  # retrieved: no "never retrieved" warning
        else:
            self._failure.cancel()


class _Progress:
    """A running clip's frame count, recorded in the store at most every :data:`PROGRESS_S` (one
    write at a time; the latest count wins) and counted for the metrics as frames are written."""

    def __init__(self, runner: JobRunner, claim: Claim) -> None:
        self.runner, self.claim = runner, claim
        self.done = 0
        self._recorded = 0
        self._counted: int | None = None
        self._last = -math.inf
        self._writing: asyncio.Task[None] | None = None

    def frames(self, done: int, _total: int) -> None:
        """ClipFlow's ``on_progress``: ``done`` frames written (the first call: where it resumed)."""
        self.done = done
        if self._counted is None:
            self._counted = done  # frames of an earlier run are not this run's
        self.runner._on_frames(self.pending_frames())
        if self._writing is None and time.monotonic() - self._last >= PROGRESS_S:
            self._writing = asyncio.create_task(self._write(), name=f"toonserve-progress-{self.claim.job_id}")

    def pending_frames(self) -> int:
        """Frames written since the last call (for the frames counter)."""
        counted = self._counted if self._counted is not None else self.done
        self._counted = self.done
        return max(0, self.done - counted)

    async def _write(self) -> None:
        try:
            while self.done > self._recorded:
                self._last = time.monotonic()
                done = self.done
                try:
                    job = await asyncio.to_thread(self.runner.store.progress, self.claim, done)
                except JobStoreError as exc:  # the next frames try again
                    log.debug("jobs: progress of job %s not recorded: %s", self.claim.job_id, exc)
                    return
                self._recorded = done
                self.runner.changed(job, self.claim.job_id)
                wait = PROGRESS_S - (time.monotonic() - self._last)
                if wait > 0:
                    await asyncio.sleep(wait)
        finally:
            self._writing = None

    async def settle(self) -> None:
        """Wait for a write in progress (the item's outcome is recorded after it, never before)."""
        if self._writing is not None:
            await asyncio.gather(self._writing, return_exceptions=True)


def _store_trouble(exc: BaseException, doing: str, retry_s: float | None = None) -> None:
    """Logs a store failure: one line for a known one (unreachable, unusable), a traceback otherwise."""
    then = f"; trying again in {retry_s:.0f} s" if retry_s is not None else ""
    if isinstance(exc, JobStoreError):
        log.warning("jobs: %s failed: %s%s", doing, exc, then)
    else:
        log.error("jobs: %s failed unexpectedly%s", doing, then, exc_info=exc)


def _child(trace: TraceContext | None) -> TraceContext:
    """A span of a job's work: below the span of the request that made the job (a job stored before
    traces: a trace of its own)."""
    return trace.child() if trace is not None else new_trace()


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
        fail_unconfigured: bool = True,
        clips: ClipFlow | None = None,
        on_frames: Callable[[int], None] | None = None,
    ) -> None:
        """``error_code(exc)``: the code an item that failed with ``exc`` reports (the service passes
        the HTTP API's, so an item's error reads like the same photo's error from /cartoonize).
        ``fail_unconfigured``: fail jobs whose style is not configured here (right when this process
        is the only runner; with a shared store another replica may serve that style). ``clips``: how
        video items run (without it, a video item ends in error); ``on_frames(n)``: ``n`` more frames
        of a clip written."""
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
        self._fail_unconfigured_jobs = fail_unconfigured
        self.clips = clips
        self._on_frames = on_frames or (lambda _: None)
        self._wake = asyncio.Event()
        self._stopping = False
        self._recovered = False
        self._claiming = False
        self._slots = asyncio.Semaphore(concurrency)
        #: Items in flight and their claims (released if still running at shutdown).
        self._items: dict[asyncio.Task[None], Claim] = {}
        self._tasks: list[asyncio.Task[None]] = []
        #: The tickets (and waits for the same photo's work) of each job's items in flight here.
        self._tickets: dict[str, set[Cancellable]] = defaultdict(set)
        self._webhook_tasks: dict[str, asyncio.Task[None]] = {}

    # -- life cycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._recover()
        except Exception as exc:  # the store is down: the service starts anyway, jobs resume later
            _store_trouble(exc, "recovering the job store at start-up (the runner tries again)")
        # Its id is its consumer name in a shared store (XINFO CONSUMERS), to tell replicas apart.
        log.info("jobs: runner %s started", self.owner)
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="toonserve-jobs"),
            asyncio.create_task(self._sweep_loop(), name="toonserve-jobs-expiry"),
        ]

    async def stop(self, timeout: float) -> None:
        """Take no more items; let those in flight finish for up to ``timeout`` seconds. Whatever is
        still running then goes back to the queue (so another replica of a shared store takes it at
        once rather than after its lease); if even that fails, it is queued again at the next start
        (or, in a shared store, after its lease)."""
        self._stopping = True
        self._wake.set()
        for task in self._tasks:
            # A claim in progress is let through (a moment): cancelled, its thread would still take
            # an item that nobody runs or hands back. The loop ends right after it.
            if not (task is self._tasks[0] and self._claiming):
                task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._items:
            await asyncio.wait(self._items, timeout=timeout)
        unfinished = dict(self._items)
        for task in [*unfinished, *self._webhook_tasks.values()]:
            task.cancel()
        await asyncio.gather(*unfinished, *self._webhook_tasks.values(), return_exceptions=True)
        for task, claim in unfinished.items():
            if task.cancelled():
                try:
                    await asyncio.to_thread(self.store.release, claim)
                except Exception as exc:
                    _store_trouble(exc, f"handing item {claim.index} of job {claim.job_id} back")

    async def _recover(self) -> None:
        requeued = await asyncio.to_thread(self.store.recover)
        if requeued:
            log.info("jobs: %d item(s) left running by an earlier process are queued again", requeued)
        self._recovered = True
        for job in await asyncio.to_thread(self.store.pending_webhooks):
            self.changed(job, job.id)  # sent now if the job has settled, else when it does

    def wake(self) -> None:
        """New work was stored."""
        self._wake.set()

    def cancel_running(self, job_id: str) -> None:
        """Stop this process's in-flight items of ``job_id`` (between pipeline stages)."""
        for ticket in self._tickets.get(job_id, ()):
            ticket.cancel()

    def changed(self, job: Job | None, job_id: str) -> None:
        """A job changed: wake its listeners; once it has settled (ended, nothing running), send its
        webhook, so the webhook's job object is final."""
        self.hub.notify(job_id)
        if job is not None and job.settled and job.webhook_state == "pending":
            self._send_webhook(job)

    # -- the loops ---------------------------------------------------------------------------------

    def _servable(self) -> set[str]:
        return {name for name, status in self.engine.status().items() if status.state == "loaded"}

    async def _fail_unconfigured(self) -> None:
        if not self._fail_unconfigured_jobs:
            return
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
        idle = True  # unconfigured styles are looked for first, then after each idle poll
        failures = 0
        while not self._stopping:
            try:
                if not self._recovered:
                    await self._recover()
                if idle:
                    await self._fail_unconfigured()
                idle = not await self._claim_one()
                failures = 0
            except Exception as exc:
                # The store is unusable for now (Redis down, disk errors): back off, never die.
                if self._stopping:
                    return
                failures += 1
                delay = backoff_s(failures, max_s=RETRY_MAX_S)
                _store_trouble(exc, "taking work", delay)
                await asyncio.sleep(delay)
                continue
            if idle:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), POLL_S)

    async def _claim_one(self) -> bool:
        """Claim an item and start running it; False if there was none."""
        await self._slots.acquire()
        claim = None
        self._claiming = True
        try:
            claim = await asyncio.to_thread(self.store.claim, self._servable(), self.owner)
        finally:
            self._claiming = False
            if claim is None:
                self._slots.release()
        if claim is None:
            return False
        # Its log lines name the job item and its client, as a request's name the request.
        context = task_context(f"job:{claim.job_id}:{claim.index}", claim.client, _child(claim.trace))
        task = asyncio.create_task(
            self._run(claim), name=f"toonserve-job-{claim.job_id}-{claim.index}", context=context
        )
        self._items[task] = claim
        task.add_done_callback(self._item_done)
        return True

    def _item_done(self, task: asyncio.Task[None]) -> None:
        claim = self._items.pop(task)
        self._slots.release()
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its claim stays in the store: queued again at the next start, or after its lease.
            _store_trouble(exc, f"running item {claim.index} of job {claim.job_id}")

    async def _sweep_loop(self) -> None:
        interval = min(60.0, max(0.5, self.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                for job_id in await asyncio.to_thread(self.store.expired, time.time()):
                    await asyncio.to_thread(self.store.delete, job_id)
                    log.info("job %s expired and was deleted", job_id)
                    self.hub.notify(job_id)
            except Exception as exc:
                _store_trouble(exc, "deleting expired jobs", interval)

    # -- one item ----------------------------------------------------------------------------------

    async def _run(self, claim: Claim) -> None:
        """One item, as a span of its own in the job's trace (when spans are exported)."""
        attributes: dict[str, tracing.AttributeValue] = {
            "toonserve.job": claim.job_id,
            "toonserve.item": claim.index,
        }
        with tracing.spanned_own(trace_var.get(), "job item", attributes=attributes):
            await self._run_item(claim)

    async def _run_item(self, claim: Claim) -> None:
        job: Job | None
        try:
            params = self.flow.options(claim.options)
        except StyleUnavailableError:
            # Its style went away meanwhile (a reload): the item waits for it again.
            await asyncio.to_thread(self.store.release, claim)
            return
        except ToonserveError as exc:
            job = await asyncio.to_thread(self.store.fail, claim.job_id, str(exc), self.ttl_s)
            self.changed(job, claim.job_id)
            return
        try:
            # The job's client takes its turn with other clients' work (codec threads, background lines).
            client = Client(claim.client, claim.client)
            if claim.frames is not None:
                clip = await self._run_clip(claim, params, client)
            else:
                data = await asyncio.to_thread(claim.input_path.read_bytes)
                outcome = await self.flow.run(
                    data,
                    params,
                    math.inf,
                    client,
                    background=True,
                    watch=lambda ticket: self._watch(claim, ticket),
                )
        except _LeaseLost:
            # Another runner holds it now and records it; this one's work is dropped unrecorded.
            log.warning(
                "jobs: item %d of job %s is no longer this runner's (taken over after its lease, or its "
                "job failed or was deleted); its work here is dropped",
                claim.index,
                claim.job_id,
            )
            return
        except AbandonedError:
            job = await self._finish(claim, "cancelled")
            self._on_item("cancelled")
        except asyncio.CancelledError:
            raise  # shutting down: stop() hands the item back
        except ToonserveError as exc:
            error = {"code": self._error_code(exc), "message": str(exc)}
            job = await self._failed(claim, error)
        except OSError as exc:
            what = "clip" if claim.frames is not None else "photo"
            error = {"code": "internal_error", "message": f"the job's {what} cannot be read: {exc}"}
            job = await self._failed(claim, error)
        except Exception as exc:
            if claim.frames is None:
                raise  # a photo's item stays claimed and runs again (the store's lease or a restart)
            # A chunk that fails this way would fail the same way every time it is taken again.
            log.exception("jobs: frames of the clip of job %s failed", claim.job_id)
            message = f"its frames could not be cartoonized ({type(exc).__name__})"
            job = await self._failed(claim, {"code": "internal_error", "message": message})
        else:
            # Recorded out of the try above: a store that cannot record it now leaves the item
            # claimed, to run again (a chunk resumes from its segments), not in error.
            if claim.frames is not None:
                job = await self._finish_clip(claim, *clip)
            else:
                job = await self._finish_photo(claim, outcome)
        if claim.frames is not None:
            await self._settle_clip(job)
        self.changed(job, claim.job_id)

    async def _failed(self, claim: Claim, error: dict[str, str]) -> Job | None:
        """An item that failed: in error; a chunk of a clip fails its job (no clip can be made of
        the others), which ends the other chunks and stops those running here."""
        self._on_item("error")
        if claim.frames is None:
            return await self._finish(claim, "error", error=error)
        last = claim.first_frame + claim.frames - 1
        message = f"frames {claim.first_frame}–{last} of the clip: {error['code']}: {error['message']}"
        job = await asyncio.to_thread(self.store.fail, claim.job_id, message, self.ttl_s)
        self.cancel_running(claim.job_id)
        return job

    async def _finish_photo(self, claim: Claim, outcome: Outcome) -> Job | None:
        job = await self._finish(
            claim,
            "ok",
            result=outcome.data,
            faces_stylized=outcome.result.faces_stylized,
            timings_ms=outcome.timings_ms,
        )
        # "error" when its result could not be written (a full or failing disk).
        ended = job.items[claim.index].status if job is not None else "ok"
        self._on_item("error" if ended == "error" else "ok")
        return job

    async def _run_clip(
        self, claim: Claim, params: ResolvedOptions, client: Client
    ) -> tuple[Path, ClipReport]:
        """A video item through :attr:`clips`, resuming from the segments in its work folder; its
        frame count recorded as it goes; its frames' file and the report. Raises what
        :meth:`_run_item` handles (a refused clip, a cancel, a lost lease)."""
        if self.clips is None:
            raise ConfigurationError("this server was started without video jobs (no ClipFlow)")
        # This claim's own folder, with the complete segments of the chunk's earlier claims in it.
        work = await asyncio.to_thread(self.store.claim_dir, claim)
        target = work / f"result.{VIDEO_SUFFIX}"
        progress = _Progress(self, claim)
        assert claim.frames is not None
        span = (claim.first_frame, claim.first_frame + claim.frames)
        guard = _ClipGuard()
        watching = asyncio.create_task(guard.watch(self._watch(claim, guard)))
        try:
            try:
                report: ClipReport = await self.clips.run(
                    claim.input_path,
                    target,
                    params,
                    work=work / SEGMENTS,
                    client=client,
                    background=True,
                    on_progress=progress.frames,
                    watch=guard.frame,
                    span=span,
                    audio=False,  # the job's clip gets it when the chunks are joined
                )
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
                guard.close()
        # A claim lost meanwhile: what stopped the run is no longer this runner's to record (the holder
        # that records the chunk may have let its folders go under it). Only this claim's own folder
        # goes; a stopped run that still holds its claim (a shutdown, a cancel) leaves its segments
        # for the next claim.
        except _LeaseLost:
            await asyncio.to_thread(remove_tree, work)
            raise
        except Exception as exc:
            if await self._holds(claim):
                raise
            await asyncio.to_thread(remove_tree, work)
            raise _LeaseLost from exc
        await progress.settle()
        self._on_frames(progress.pending_frames())
        resumed = f", resumed from frame {report.resumed_from}" if report.resumed_from > span[0] else ""
        log.info(
            "jobs: frames %d–%d of the clip of job %s%s, %.1f frames/s",
            span[0],
            span[1] - 1,
            claim.job_id,
            resumed,
            report.frames_per_s,
        )
        return target, report

    async def _finish_clip(self, claim: Claim, target: Path, report: ClipReport) -> Job | None:
        timings = {**report.timings_ms, "frames_per_s": round(report.frames_per_s, 2)}
        job = await self._finish(
            claim, "ok", result=target, faces_stylized=report.faces_max, timings_ms=timings
        )
        # Recorded, the chunk's folders went with it; a result left here was not this claim's to
        # record (another runner took the chunk over, or the job was deleted): its folder goes.
        await asyncio.to_thread(remove_tree, target.parent)
        ended = job.items[claim.index].status if job is not None else "ok"
        self._on_item("error" if ended == "error" else "ok")
        return job

    async def _settle_clip(self, job: Job | None) -> None:
        """After a video item ended: once its job has settled, the chunks joined into its clip (every
        chunk ok), or the clip's file and work folders removed (it ended without one)."""
        if job is None or not job.settled:
            return
        try:
            if all(item.status == "ok" for item in job.items):
                await asyncio.to_thread(self.store.join_clip, job)
            else:
                await asyncio.to_thread(self.store.drop_clip, job)
        except (ToonserveError, OSError) as exc:  # GET /jobs/{id}/result tries the join again
            log.error("jobs: the clip of job %s could not be joined or let go: %s", job.id, exc)

    async def _finish(self, claim: Claim, status: ItemStatus, **fields: Any) -> Job | None:
        """``store.finish``, tried again a few times while the store cannot be used (the outcome is
        kept meanwhile); the last failure is raised, and the item then runs again later."""
        for attempt in range(1, FINISH_ATTEMPTS + 1):
            try:
                return await asyncio.to_thread(self.store.finish, claim, status, ttl_s=self.ttl_s, **fields)
            except JobStoreError as exc:
                if attempt == FINISH_ATTEMPTS:
                    raise
                delay = backoff_s(attempt)
                _store_trouble(exc, f"recording item {claim.index} of job {claim.job_id}", delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _holds(self, claim: Claim) -> bool:
        """Whether this runner still holds ``claim`` (True when the store cannot say now: the outcome
        is then recorded as usual, or not at all if the store is still away)."""
        try:
            return await asyncio.to_thread(self.store.renew, claim)
        except JobStoreError:
            return True

    async def _watch(self, claim: Claim, ticket: Cancellable) -> None:
        """Beside an item's wait (:meth:`Flow.wait`): its ticket is cancelled when its job is cancelled
        here or in another process (it then stops between stages and ends ``cancelled``), and
        :class:`_LeaseLost` is raised when another runner took the item over (its work here is
        dropped)."""
        self._tickets[claim.job_id].add(ticket)
        try:
            while True:
                await asyncio.sleep(POLL_S)
                try:
                    job = await asyncio.to_thread(self.store.get, claim.job_id)
                    gone = job is None or job.status == "cancelled"
                    held = gone or await asyncio.to_thread(self.store.renew, claim)
                except JobStoreError as exc:
                    # Cannot check now (Redis away): keep working; the next poll checks again.
                    log.debug("jobs: cannot check item %d of job %s: %s", claim.index, claim.job_id, exc)
                    continue
                if gone or (job is not None and job.status == "failed"):
                    ticket.cancel()  # a failed job's running items stop too
                    return
                if not held:
                    raise _LeaseLost
        finally:
            self._tickets[claim.job_id].discard(ticket)
            if not self._tickets[claim.job_id]:
                del self._tickets[claim.job_id]

    def _send_webhook(self, job: Job) -> None:
        if job.id in self._webhook_tasks or job.webhook is None:
            return

        async def send() -> None:
            try:
                with tracing.spanned_own(
                    trace_var.get(), "webhook", kind="client", attributes={"toonserve.job": job.id}
                ):
                    delivered = await self.webhooks.deliver(job)
                await asyncio.to_thread(
                    self.store.set_webhook_state, job.id, "delivered" if delivered else "failed"
                )
            except asyncio.CancelledError:
                raise  # shutting down: still pending, resumed at the next start
            except JobStoreError as exc:
                # Still pending in the store: resumed at a start, so it may arrive twice.
                _store_trouble(exc, f"recording the webhook of job {job.id}")
            except Exception:
                # A bug in delivering must not leave the job pending for ever: recorded as failed.
                log.exception("webhook of job %s could not be sent", job.id)
                try:
                    await asyncio.to_thread(self.store.set_webhook_state, job.id, "failed")
                except JobStoreError as exc:
                    _store_trouble(exc, f"recording the webhook of job {job.id}")
            finally:
                self._webhook_tasks.pop(job.id, None)

        self._webhook_tasks[job.id] = asyncio.create_task(
            send(),
            name=f"toonserve-webhook-{job.id}",
            context=task_context(f"job:{job.id}:webhook", job.client, _child(job.trace)),
        )
