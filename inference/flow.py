"""The one request flow: bytes in → decode → submit → wait → encode → bytes out, with timings.

``POST /cartoonize``, ``POST /cartoonize/batch``, the jobs runner and ``toonserve cartoonize`` all go
through :class:`Flow`; routes only parse their form and shape the response. The stages are public so
a caller that handles several images (the batch route) can decode them all, ask for room once, then
submit and wait; :meth:`Flow.run` chains them for one image.

* ``decode`` and ``encode`` run on the flow's own small thread pool (``codec_threads``), never on the
  event loop, so one request's decode and encode overlap another's model work without a thread per
  request competing for the cores;
* ``submit`` hands the pixels to the engine's worker (:class:`~inference.scheduler.Scheduler`), which
  refuses at once with :class:`~inference.scheduler.QueueFullError` when its queue is full;
* ``wait`` is async and cancellable: cancelling the awaiting task (client gone) cancels the ticket, so
  queued work is dropped and running work stops between stages; at the deadline it raises
  :class:`~inference.scheduler.DeadlineExceededError`.

Timings (milliseconds): ``decode``, ``queue`` (wait for the worker), each pipeline stage, ``encode``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Final, TypeVar

from inference.engine import Engine
from inference.images import MEDIA_TYPES, DecodedImage, OutputFormat, decode, encode
from inference.pipeline import (
    DEFAULT_NO_FACE,
    DEFAULT_STRENGTH,
    MAX_OUTPUT_SIDE,
    MIN_OUTPUT_SIDE,
    STAGES,
    NoFacePolicy,
    Options,
    OptionsError,
    Result,
)
from inference.scheduler import DeadlineExceededError, Ticket

_T = TypeVar("_T")

#: Names of the flow's timings, in order.
TIMINGS: Final = ("decode", "queue", *STAGES, "encode")


@dataclass(frozen=True)
class Defaults:
    """What a request gets for the fields it leaves out (the service fills it from its settings)."""

    style: str
    processing_size: int
    output_format: OutputFormat
    quality: int
    min_face_size: float
    max_faces: int


@dataclass(frozen=True)
class Params:
    """One request's validated choices."""

    style: str
    options: Options
    #: Long side of the result; None keeps the input's size.
    output_side: int | None
    fmt: OutputFormat
    quality: int

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.fmt]


@dataclass(frozen=True)
class Decoded:
    """A decoded upload and what decoding it cost."""

    image: DecodedImage
    ms: float


@dataclass(frozen=True)
class Outcome:
    """One finished image: the pipeline's result, its encoded bytes and every timing."""

    result: Result
    data: bytes
    params: Params
    timings_ms: dict[str, float]


def output_shape(input_hw: tuple[int, int], long_side: int | None) -> tuple[int, int] | None:
    """(height, width) of the result whose long side is ``long_side``, the aspect kept; None: input's."""
    if long_side is None:
        return None
    h, w = input_hw
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


class Flow:
    """Decode → submit → wait → encode for one engine (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        defaults: Defaults,
        *,
        max_pixels: int,
        timeout_s: float,
        codec_threads: int,
        on_result: Callable[[Result], None] | None = None,
    ) -> None:
        self.engine = engine
        self.defaults = defaults
        self.max_pixels = max_pixels
        self.timeout_s = timeout_s
        self._on_result = on_result or (lambda _: None)
        self._codec = ThreadPoolExecutor(max_workers=codec_threads, thread_name_prefix="toonserve-codec")

    def close(self) -> None:
        self._codec.shutdown(wait=True)

    def params(
        self,
        *,
        style: str | None = None,
        strength: float = DEFAULT_STRENGTH,
        processing_size: int | None = None,
        output_size: int | None = None,
        fmt: OutputFormat | None = None,
        quality: int | None = None,
        no_face: NoFacePolicy = DEFAULT_NO_FACE,
    ) -> Params:
        """A request's choices, defaults filled in and checked: the style can serve now
        (:meth:`Engine.check`), the options are in range (:class:`OptionsError`)."""
        d = self.defaults
        style = style or d.style
        self.engine.check(style)
        if output_size is not None and not MIN_OUTPUT_SIDE <= output_size <= MAX_OUTPUT_SIDE:
            raise OptionsError(
                f"output_size must be in [{MIN_OUTPUT_SIDE}, {MAX_OUTPUT_SIDE}], got {output_size}"
            )
        options = Options(
            processing_size=processing_size or d.processing_size,
            strength=strength,
            no_face=no_face,
            min_face_size=d.min_face_size,
            max_faces=d.max_faces,
        )
        return Params(style, options, output_size, fmt or d.output_format, quality or d.quality)

    def deadline(self) -> float:
        """The ``time.monotonic()`` deadline of an image submitted now."""
        return time.monotonic() + self.timeout_s

    # -- stages ------------------------------------------------------------------------------------

    async def _in_codec(self, fn: Callable[[], _T]) -> tuple[_T, float]:
        start = time.perf_counter()
        value = await asyncio.get_running_loop().run_in_executor(self._codec, fn)
        return value, (time.perf_counter() - start) * 1000

    async def decode(self, data: bytes) -> Decoded:
        """Uploaded bytes → pixels (off the event loop); raises the :mod:`inference.images` errors."""
        image, ms = await self._in_codec(lambda: decode(data, max_pixels=self.max_pixels))
        return Decoded(image, ms)

    def submit(self, params: Params, decoded: Decoded, deadline: float, background: bool = False) -> Ticket:
        """Queue the image on the engine's worker; raises QueueFullError / SchedulerClosedError.
        ``background`` (job items): the worker's low-priority queue, which never refuses."""
        options = params.options
        out_hw = output_shape(decoded.image.pixels.shape[:2], params.output_side)
        if out_hw is not None:
            options = replace(options, output_size=out_hw)
        return self.engine.scheduler.submit(
            params.style, decoded.image.pixels, options, deadline, background=background
        )

    async def wait(self, ticket: Ticket) -> Result:
        """The ticket's result. Cancelling the caller cancels the ticket; at its deadline the ticket is
        dropped and :class:`DeadlineExceededError` raised."""
        fut = asyncio.wrap_future(ticket.future)
        fut.add_done_callback(_consume)
        timeout = None if math.isinf(ticket.deadline) else max(0.0, ticket.deadline - time.monotonic())
        try:
            result = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            ticket.cancel()
            raise DeadlineExceededError(
                f"no result within {self.timeout_s:g} s (queue wait included)"
            ) from None
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        self._on_result(result)
        return result

    async def encode(self, result: Result, params: Params) -> tuple[bytes, float]:
        """The result's image in the requested format (off the event loop), and the time it took."""
        return await self._in_codec(lambda: encode(result.image, params.fmt, params.quality))

    async def finish(self, result: Result, params: Params, decoded: Decoded, ticket: Ticket) -> Outcome:
        """Encode a result and put every timing together."""
        data, encode_ms = await self.encode(result, params)
        timings = {"decode": decoded.ms, "queue": ticket.queue_wait_ms}
        timings.update((s, result.timings_ms[s]) for s in STAGES)
        timings["encode"] = encode_ms
        return Outcome(result, data, params, {k: round(v, 3) for k, v in timings.items()})

    async def run(self, data: bytes, params: Params, deadline: float | None = None) -> Outcome:
        """The whole flow for one image."""
        decoded = await self.decode(data)
        ticket = self.submit(params, decoded, self.deadline() if deadline is None else deadline)
        result = await self.wait(ticket)
        return await self.finish(result, params, decoded, ticket)


def _consume(fut: asyncio.Future[Result]) -> None:
    # A result nobody waits for any more (timed out, client gone) must not log "never retrieved".
    if not fut.cancelled():
        fut.exception()
