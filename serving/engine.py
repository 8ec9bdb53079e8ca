"""The engine of one device: resident styles, the face detector, the pipelines and the worker.

An :class:`Engine` owns everything that does model work on its device: the :class:`ModelStore`
(generators and masks), one :class:`FaceDetector`, one :class:`Cartoonizer` per style and the
:class:`Scheduler` whose single worker thread runs them. The service builds exactly one, in one
factory (``service.factory.build_engine``), and the app, the CLI and the benchmarks all use it.

Styles load and fail independently, in a background thread, the default style first:

* a style is ``loading``, then ``loaded`` once its weights are resident and a blank photo has gone
  through its whole pipeline (detector included), or ``failed`` with the actionable message;
* a failed style is tried again with exponential backoff (``retry_initial_s`` doubling up to
  ``retry_max_s``), so a replica whose network comes back recovers by itself;
  :attr:`StyleStatus.next_attempt` says when. Meanwhile its files are looked for every
  :data:`LOOK_S` seconds (a few ``stat`` calls): weights copied in are loaded as soon as they have
  stopped changing, without waiting for the backoff; :meth:`Engine.retry_now` tries every failed
  style at once (``POST /admin/reload``);
* the engine is :attr:`ready` once the default style is loaded; requests for any loaded style are
  served meanwhile, requests for a style that is loading or failed are refused at once
  (:meth:`check`) with the reason and when to retry.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import numpy as np

from inference.backends import BackendDecision
from inference.constants import DEFAULT_HEAD_BATCH
from inference.errors import StyleLoadingError, StyleUnavailableError, ToonserveError
from inference.faces import FaceDetector, create_detector
from inference.models import DtypeChoice, ModelStore, StyleNotLoadedError
from inference.pipeline import Cartoonizer, Options
from inference.styles import get_style
from inference.weights import WeightsKind
from serving.cost import cost_pixels
from serving.retry import backoff_s
from serving.scheduler import (
    DEFAULT_BATCH_WAIT_S,
    DEFAULT_INTERACTIVE_GRACE_S,
    DEFAULT_QUEUE_SIZE,
    Scheduler,
)

log = logging.getLogger(__name__)

StyleState = Literal["loading", "loaded", "failed"]

#: First wait before a failed style is tried again; it doubles after each failure up to the cap.
RETRY_INITIAL_S: Final = 5.0
#: Default cap of that wait (the service's ``TOONSERVE_WEIGHTS_RETRY_MAX_S``).
DEFAULT_RETRY_MAX_S: Final = 300.0
#: Side of the blank photo pushed through a style's whole pipeline before it serves.
WARMUP_SIDE: Final = 128
#: How many times the default style runs a blank photo of ``warmup_size`` before the engine is ready:
#: with int8 on ONNX Runtime the first run at a new size touched about 150 MB of new memory and the
#: second 210 MB more (its memory plan), and a first touch could cost 0.9 s of kernel time; after two
#: runs the first requests touch under 10,000 new pages, most of them in the detector's later stages,
#: which a blank photo does not reach.
WARMUP_RUNS: Final = 2
#: Sides of the small and large blank photos whose times anchor the worker's cost model, measured
#: (twice each, the faster kept: a first run at a new size pays one-off set-up) when the first style
#: loads: 64 px costs about the fixed part alone, 512 px mostly the per-pixel part.
CALIBRATION_SIDES: Final = (64, 512)
#: How often the files of a failed style are looked for (seconds).
LOOK_S: Final = 2.0
#: Retry-After for a style that is still loading (seconds).
LOADING_RETRY_AFTER_S: Final = 5


@dataclass(frozen=True)
class StyleStatus:
    """Where one configured style stands. Times are ``time.monotonic()`` seconds."""

    name: str
    state: StyleState = "loading"
    #: Why it failed (actionable), while ``state == "failed"``.
    error: str | None = None
    #: Failed attempts so far (reset when it loads).
    failures: int = 0
    #: When the next attempt starts, while ``state == "failed"``.
    next_attempt: float | None = None
    #: Where its weights came from, once loaded.
    source: str | None = None
    #: What its weights are, once loaded: a real model's (``modelscope``) or ``demo`` weights.
    weights: WeightsKind | None = None
    #: Its weights' version once loaded (:attr:`inference.models.LoadedStyle.version`): results are
    #: cached and tagged under it.
    version: str | None = None
    #: Which generator backend runs it once loaded, and what decided it (``TOONSERVE_BACKEND=auto``
    #: measures; :mod:`inference.backends`).
    backend: BackendDecision | None = None
    #: Its generators' precision once loaded, and why (:attr:`inference.models.LoadedStyle.precision`).
    precision: DtypeChoice | None = None

    def next_attempt_in(self, now: float | None = None) -> float | None:
        """Seconds until the next attempt (0 when due), or None when none is planned."""
        if self.next_attempt is None:
            return None
        return max(0.0, self.next_attempt - (time.monotonic() if now is None else now))


#: The cost model's anchors measured in this process, by device, dtype and the backend that ran them.
_ANCHORS: dict[tuple[str, str, str], list[tuple[int, float]]] = {}


def _run_blank(cartoonizer: Cartoonizer, side: int) -> float:
    """Seconds a blank ``side``×``side`` photo takes through the whole pipeline."""
    blank = np.full((side, side, 3), 128, dtype=np.uint8)
    start = time.perf_counter()
    cartoonizer.run(blank, Options(no_face="background"))
    return time.perf_counter() - start


class Engine:
    """One device's models and worker (module docstring). Thread-safe; :meth:`start` once."""

    def __init__(
        self,
        store: ModelStore,
        styles: Sequence[str],
        default_style: str,
        *,
        detector: str = "mtcnn",
        smallest_face: float | None = None,
        detector_options: dict[str, Any] | None = None,
        max_batch: int = 1,
        head_batch: int = DEFAULT_HEAD_BATCH,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        batch_wait_s: float = DEFAULT_BATCH_WAIT_S,
        interactive_grace_s: float = DEFAULT_INTERACTIVE_GRACE_S,
        retry_initial_s: float = RETRY_INITIAL_S,
        retry_max_s: float = DEFAULT_RETRY_MAX_S,
        retry: bool = True,
        on_outcome: Callable[[str, str], None] | None = None,
        explain: Callable[[str, ToonserveError], str] | None = None,
        warmup_size: tuple[int, int] | None = None,
    ) -> None:
        """``styles``: the styles to load (``default_style`` among them, loaded first).
        ``retry``: try failed styles again with backoff (False for one-shot tools such as the CLI).
        ``explain(style, error)``: the message shown for a failed style (the service adds the
        settings that fix it); default ``str(error)``. ``smallest_face``: faces smaller than this
        (processing pixels) are not stylised, so the detector need not look for them.
        ``warmup_size``: the (height, width) most photos are processed at; the default style runs
        blank ones of that size (:data:`WARMUP_RUNS`) before the engine is ready, so that the first
        requests are not the ones that set up that size (None: only the small warm-up)."""
        for name in styles:
            get_style(name)
        if default_style not in styles:
            raise ValueError(f"the default style {default_style!r} must be among {list(styles)}")
        self.store = store
        self.default_style = default_style
        self.styles: tuple[str, ...] = (
            default_style,
            *(s for s in dict.fromkeys(styles) if s != default_style),
        )
        self.detector_name = detector
        self.smallest_face = smallest_face
        self.detector_options = dict(detector_options or {})
        self.max_batch = max_batch
        self.head_batch = head_batch
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self.retry = retry
        self.warmup_size = warmup_size
        self._explain = explain or (lambda _style, exc: str(exc))
        self.scheduler = Scheduler(
            {},
            queue_size=queue_size,
            max_batch=max_batch,
            batch_wait=batch_wait_s,
            name=str(store.device),
            on_outcome=on_outcome,
            interactive_grace=interactive_grace_s,
        )
        self.detector: FaceDetector | None = None
        #: Why the face detector could not be built (then nothing can serve).
        self.detector_error: str | None = None
        self._status = {name: StyleStatus(name) for name in self.styles}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stop = threading.Event()
        #: Set to make the loader look again at once (a retry was asked for, or it must stop).
        self._poke = threading.Event()
        #: Per failed style: its files' fingerprint at the last look, and when its last attempt failed.
        self._seen: dict[str, tuple[object, ...] | None] = {}
        self._failed_with: dict[str, tuple[object, ...] | None] = {}
        self._ready = threading.Event()
        self._loader = threading.Thread(target=self._load_loop, name="toonserve-loader", daemon=True)

    # -- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and the background loading of every style."""
        self.scheduler.start()
        self._loader.start()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop loading, finish (``drain``) or refuse queued work, and release the models."""
        self._stop.set()
        self._poke.set()
        with self._changed:
            self._changed.notify_all()
        self.scheduler.close(drain, timeout)
        # A download in progress cannot be interrupted; the thread is a daemon and is left to end.
        self._loader.join(timeout=1.0)
        self.store.release()

    @property
    def ready(self) -> bool:
        """The default style is loaded and warm."""
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def wait_settled(self, style: str, timeout: float | None = None) -> StyleStatus:
        """Block until ``style`` has loaded or failed at least once (or ``timeout``); its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while True:
                status = self._status[style]
                if status.state == "loaded" or status.failures > 0 or self.detector_error is not None:
                    return status
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return status
                self._changed.wait(remaining)

    def cartoonizer(self, style: str) -> Cartoonizer:
        """The loaded pipeline of ``style``, for callers that run it directly (benchmarks, tests);
        raises as :meth:`check` does. Model work for requests goes through :attr:`scheduler`."""
        self.check(style)
        return self.scheduler.cartoonizers[style]

    # -- what requests ask -------------------------------------------------------------------------

    def status(self) -> dict[str, StyleStatus]:
        """Every configured style's status, the default first."""
        with self._lock:
            return dict(self._status)

    def check(self, style: str) -> None:
        """Raise unless ``style`` can serve now: :class:`~inference.errors.UnknownStyleError`,
        :class:`StyleNotLoadedError` (not configured here), :class:`StyleLoadingError` or
        :class:`StyleUnavailableError` (failed; the message says why, ``retry_after`` when it is
        tried again)."""
        get_style(style)
        status = self._status.get(style)
        if status is None:
            raise StyleNotLoadedError(
                f"style {style!r} is not configured on this server; configured: {', '.join(self.styles)}"
            )
        if status.state == "loaded":
            return
        if self.detector_error is not None:
            raise StyleUnavailableError(
                f"the face detector could not be built: {self.detector_error}", LOADING_RETRY_AFTER_S
            )
        if status.state == "failed":
            wait = status.next_attempt_in()
            retry_after = max(1, math.ceil(wait)) if wait is not None else LOADING_RETRY_AFTER_S
            when = f"; next attempt in {retry_after} s" if wait is not None else ""
            raise StyleUnavailableError(f"style {style!r} is unavailable: {status.error}{when}", retry_after)
        raise StyleLoadingError(f"style {style!r} is still loading", LOADING_RETRY_AFTER_S)

    def not_ready_reason(self) -> str:
        """Why :attr:`ready` is false, for a person: each configured style's state."""
        if self.detector_error is not None:
            return f"the face detector could not be built: {self.detector_error}"
        parts = []
        for status in self.status().values():
            if status.state == "failed":
                wait = status.next_attempt_in()
                when = f" (next attempt in {math.ceil(wait)} s)" if wait is not None else ""
                parts.append(f"{status.name}: failed{when}: {status.error}")
            else:
                parts.append(f"{status.name}: {status.state}")
        return "; ".join(parts)

    def retry_now(self) -> list[str]:
        """Try every failed style again at once (the files were put in place, the network is back);
        the styles that will be tried."""
        with self._changed:
            failed = [name for name, status in self._status.items() if status.state == "failed"]
            for name in failed:
                self._status[name] = replace(self._status[name], next_attempt=time.monotonic())
            self._changed.notify_all()
        self._poke.set()
        return failed

    def retry_after(self) -> int:
        """Seconds a client should wait before asking again while not ready."""
        wait = self._status[self.default_style].next_attempt_in()
        return max(1, math.ceil(wait)) if wait is not None else LOADING_RETRY_AFTER_S

    # -- loading -----------------------------------------------------------------------------------

    def _calibrate(self, cartoonizer: Cartoonizer) -> None:
        """Anchor the worker's cost model on a small and a large blank photo (before the worker serves
        anything: the first style is not loaded yet). Measured once per process for a device, dtype
        and backend: every style has the same networks (and ``auto`` gives every style the backend
        it measured for the first, unless a style's weights miss the accuracy bound on it)."""
        store = self.store
        style = cartoonizer.style
        backend = style.backend.backend if style.backend is not None else str(store.backend)
        hardware = (str(store.device), str(style.bg.dtype), backend)
        anchors = _ANCHORS.get(hardware)
        if anchors is None:
            anchors = [
                (cost_pixels(side, side), min(_run_blank(cartoonizer, side) for _ in range(2)))
                for side in CALIBRATION_SIDES
            ]
            _ANCHORS[hardware] = anchors
        self.scheduler.cost.calibrate(anchors[0], anchors[1])
        est = self.scheduler.cost.estimate
        log.info(
            "worker %s: an image costs about %.0f ms plus %.2f s per million pixels",
            self.scheduler.name,
            est.per_image_s * 1000,
            est.per_pixel_s * 1e6,
        )

    def _set(self, name: str, **changes: Any) -> StyleStatus:
        with self._changed:
            status = replace(self._status[name], **changes)
            self._status[name] = status
            self._changed.notify_all()
            return status

    def _load_loop(self) -> None:
        try:
            self.detector = create_detector(
                self.detector_name,
                self.store.device,
                smallest_face=self.smallest_face,
                **self.detector_options,
            )
        except ToonserveError as exc:
            with self._changed:
                self.detector_error = str(exc)
                self._changed.notify_all()
            log.error("face detector %r could not be built: %s", self.detector_name, exc)
            return
        while not self._stop.is_set():
            now = time.monotonic()
            pending = [s for s in self.status().values() if s.state != "loaded"]
            if not pending:
                return
            due = [s for s in pending if s.next_attempt is None or s.next_attempt <= now]
            for status in due:
                if self._stop.is_set():
                    return
                self._load_one(status)
            if not self.retry and all(s.failures for s in self.status().values() if s.state != "loaded"):
                return
            waits = [s.next_attempt - time.monotonic() for s in self.status().values() if s.next_attempt]
            if waits:
                self._poke.wait(max(0.0, min(*waits, LOOK_S)))
                self._poke.clear()
                self._look_for_files()

    def _look_for_files(self) -> None:
        """A failed style whose files are on disk, unchanged since the last look (a copy in progress
        grows) and not those its last attempt failed with, is due now."""
        for status in self.status().values():
            if status.state != "failed":
                continue
            now = self.store.weights_on_disk(status.name)
            stable = now is not None and now == self._seen.get(status.name)
            self._seen[status.name] = now
            if stable and now != self._failed_with.get(status.name):
                log.info("style %s: its files are in place; loading them", status.name)
                self._set(status.name, next_attempt=time.monotonic())

    def _load_one(self, status: StyleStatus) -> None:
        name = status.name
        if status.state == "failed":
            self._set(name, state="loading")
        assert self.detector is not None
        # What this attempt finds on disk; files that appear while it runs (a download failing for
        # 20 s, say) are not held against them.
        found = self.store.weights_on_disk(name)
        try:
            loaded = self.store.load(name)
            cartoonizer = Cartoonizer(
                loaded, self.detector, bg_batch=self.max_batch, head_batch=self.head_batch
            )
            _run_blank(cartoonizer, WARMUP_SIDE)
            if name == self.default_style and self.warmup_size is not None:
                start = time.perf_counter()
                for _ in range(WARMUP_RUNS):
                    cartoonizer.warm_up(*self.warmup_size)
                log.info(
                    "style %s: warmed up at %d×%d in %.0f ms",
                    name,
                    *self.warmup_size,
                    (time.perf_counter() - start) * 1000,
                )
            if not self.scheduler.cost.calibrated:
                self._calibrate(cartoonizer)
        except ToonserveError as exc:
            # The same files are not tried again before the backoff; new or changed ones are.
            self._failed_with[name] = found
            failures = status.failures + 1
            delay = backoff_s(failures, self.retry_initial_s, self.retry_max_s) if self.retry else None
            message = self._explain(name, exc)
            self._set(
                name,
                state="failed",
                error=message,
                failures=failures,
                next_attempt=None if delay is None else time.monotonic() + delay,
            )
            if failures == 1:
                log.error("style %s not loaded: %s", name, message)
            else:
                log.warning("style %s still unavailable after %d attempts: %s", name, failures, message)
            if delay is not None:
                log.info("style %s: next attempt in %.0f s", name, delay)
            return
        self.scheduler.add(name, cartoonizer)
        self._set(
            name,
            state="loaded",
            error=None,
            failures=0,
            next_attempt=None,
            source=loaded.weights.source,
            weights=loaded.weights.kind,
            version=loaded.version,
            backend=loaded.backend,
            precision=self.store.precision_of(name),
        )
        if loaded.weights.demo:
            log.warning(
                "style %s runs on DEMO weights (random, in the official architecture): its images are "
                "not real cartoons; for the real model: toonserve download %s (see the README, "
                "Weights on a machine without internet)",
                name,
                name,
            )
        if name == self.default_style:
            self._ready.set()
        log.info("style %s ready on %s", name, self.store.device)
