"""The one request flow: bytes in → decode → submit → wait → encode → bytes out, with timings.

``POST /cartoonize``, ``POST /cartoonize/batch``, the jobs runner and ``toonserve cartoonize`` all go
through :class:`Flow`; routes only parse their form and shape the response. The stages are public so
a caller that handles several images (the batch route) can decode them all, ask for room once, then
submit and wait; :meth:`Flow.run` chains them for one image.

* ``decode`` and ``encode`` run on the flow's own few threads (``codec_threads``), never on the
  event loop, so one request's decode and encode overlap another's model work without a thread per
  request competing for the cores; those threads are shared between clients in fair shares
  (:class:`~serving.codec_pool.CodecPool`); on a CUDA engine with a
  :class:`~serving.gpu_codec.GpuCodec`, the JPEGs it takes are decoded (and brought to the
  processing size) on the device, and JPEG results encoded there, Pillow doing the rest;
* ``submit`` hands the pixels to the engine's worker (:class:`~serving.scheduler.Scheduler`), which
  refuses at once with :class:`~serving.tickets.QueueFullError` when its queue is full;
* ``wait`` is async and cancellable: cancelling the awaiting task (client gone) cancels the ticket, so
  queued work is dropped and running work stops between stages; at the deadline it raises
  :class:`~serving.tickets.DeadlineExceededError`.

Timings (milliseconds): ``decode``, ``queue`` (wait for the worker), each pipeline stage, ``encode``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, TypeVar

import numpy as np
from torch import Tensor

from inference.constants import (
    DEFAULT_MAX_FACES,
    DEFAULT_MAX_PROCESSING_PIXELS,
    DEFAULT_MIN_FACE_SIZE,
    STAGES,
)
from inference.errors import OptionsError, ToonserveError
from inference.geometry import processing_shape, resize_rgb, to_rgb_array
from inference.pipeline import Options, Result
from serving.codec_pool import CodecPool
from serving.cost import cost_pixels
from serving.encoding import DEFAULT_PNG_COMPRESSION, encode
from serving.engine import Engine
from serving.gpu_codec import GpuCodec
from serving.images import (
    DEFAULT_MAX_PIXELS,
    MAX_DECODER_COPIES,
    ImageInfo,
    ImageTooLargeError,
    decode,
    plan_decode,
    probe,
)
from serving.options import RequestOptions, ResolvedOptions
from serving.tickets import Admission, Client, DeadlineExceededError, QueueFullError, Ticket

_T = TypeVar("_T")

#: How much a requested output's long side may exceed the photo's, by default.
DEFAULT_MAX_UPSCALE: Final = 4.0
#: Decoded pixels held at once by all decodes in progress, every copy a decoder makes counted
#: (:attr:`~serving.images.DecodePlan.held`), by default: what the largest photo takes through the
#: hungriest decoder (160 M, about 560 MB). Large PNGs, WebPs and JPEGs are decoded reduced, so
#: several of those fit at once.
DEFAULT_MAX_INFLIGHT_PIXELS: Final = MAX_DECODER_COPIES * DEFAULT_MAX_PIXELS

#: Names of the flow's timings, in order.
TIMINGS: Final = ("decode", "queue", *STAGES, "encode")


@dataclass(frozen=True)
class Decoded:
    """An upload made ready for the pipeline: decoded (a JPEG at a reduced scale when that is enough),
    composited over white if transparent, and brought to its processing size, so that only that
    much stays in memory while it waits."""

    #: (h, w, 3) uint8 RGB at the processing size: a host array, or a tensor on the engine's device
    #: when the GPU decoder took the file.
    pixels: np.ndarray | Tensor
    #: The photo's own upright (height, width).
    input_size: tuple[int, int]
    ms: float


#: What an :class:`Outcome`'s result holds in place of its pixels once they are encoded.
_NO_PIXELS: Final = np.zeros((0, 0, 3), np.uint8)


@dataclass(frozen=True)
class Outcome:
    """One finished image: the pipeline's report (faces, sizes, timings; its pixels let go once
    encoded: a batch of sixteen 40 MP results would otherwise hold 1.9 GB until the last is done), its
    encoded bytes and every timing."""

    result: Result
    data: bytes
    params: ResolvedOptions
    timings_ms: dict[str, float]


def output_shape(input_hw: tuple[int, int], long_side: int | None) -> tuple[int, int] | None:
    """(height, width) of the result whose long side is ``long_side``, the aspect kept; None: input's."""
    if long_side is None:
        return None
    h, w = input_hw
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


@dataclass(frozen=True)
class Limits:
    """What one image may cost, and how the server runs it whatever the request (the service fills it
    from its settings)."""

    #: Largest photo decoded (width × height), checked from its header.
    max_pixels: int = DEFAULT_MAX_PIXELS
    #: Most pixels the models run on per photo (the processing image is shrunk to fit).
    max_processing_pixels: int = DEFAULT_MAX_PROCESSING_PIXELS
    #: Decoded pixels held at once by all decodes in progress.
    max_inflight_pixels: int = DEFAULT_MAX_INFLIGHT_PIXELS
    #: Largest requested output (width × height).
    max_output_pixels: int = DEFAULT_MAX_PIXELS
    #: Most a requested output's long side may exceed the photo's.
    max_upscale: float = DEFAULT_MAX_UPSCALE
    #: Decode large photos at a reduced scale when that still leaves twice the processing size.
    reduced_decode: bool = True
    #: Smallest face box side (processing pixels) stylised, and most faces stylised per photo.
    min_face_size: float = DEFAULT_MIN_FACE_SIZE
    max_faces: int = DEFAULT_MAX_FACES
    #: PNG's zlib level (0–9).
    png_compression: int = DEFAULT_PNG_COMPRESSION


class _PixelBudget:
    """An async semaphore counted in pixels: decodes in progress hold what they decode."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._changed: asyncio.Condition | None = None

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int, timeout: float | None = None) -> AsyncIterator[None]:
        """Hold ``pixels`` of the budget; waits at most ``timeout`` seconds for them, then raises
        :class:`~serving.tickets.QueueFullError`."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self.used + pixels <= self.capacity), timeout
                )
            except TimeoutError:
                raise QueueFullError(
                    f"too many large images are being decoded ({self.used / 1e6:.0f} of "
                    f"{self.capacity / 1e6:.0f} MP in flight) to decode this one in time; retry in a few s",
                    max(1, math.ceil(timeout or 1)),
                ) from None
            self.used += pixels
        try:
            yield
        finally:
            async with self._changed:
                self.used -= pixels
                self._changed.notify_all()


class Flow:
    """Decode → submit → wait → encode for one engine (module docstring)."""

    def __init__(
        self,
        engine: Engine,
        defaults: ResolvedOptions,
        *,
        limits: Limits,
        timeout_s: float,
        codec_threads: int,
        on_result: Callable[[Result], None] | None = None,
        gpu_codec: GpuCodec | None = None,
    ) -> None:
        """``defaults``: what a request gets for the options it leaves out. ``gpu_codec``: decode and
        encode the JPEGs it takes on the engine's device (None: Pillow)."""
        self.engine = engine
        self.gpu_codec = gpu_codec
        self.defaults = defaults
        self.limits = limits
        self.timeout_s = timeout_s
        self._on_result = on_result or (lambda _: None)
        self._codec = CodecPool(codec_threads)
        self._decoding = _PixelBudget(limits.max_inflight_pixels)

    @property
    def max_pixels(self) -> int:
        return self.limits.max_pixels

    def close(self) -> None:
        self._codec.shutdown(wait=True)

    def options(self, request: RequestOptions) -> ResolvedOptions:
        """A request's options with the service's defaults filled in, checked that its style can serve
        now (:meth:`Engine.check`); the ranges were checked when ``request`` was made."""
        resolved = request.resolved(self.defaults)
        self.engine.check(resolved.style)
        return resolved

    def pipeline_options(self, params: ResolvedOptions, **extra: Any) -> Options:
        """The pipeline's options for a request's (and the server's limits); ``extra`` sets the
        per-image ones (``input_size``, ``output_size``, …)."""
        lim = self.limits
        return Options(
            processing_size=params.processing_size,
            strength=params.strength,
            no_face=params.no_face,
            min_face_size=lim.min_face_size,
            max_faces=lim.max_faces,
            max_processing_pixels=lim.max_processing_pixels,
            **extra,
        )

    def processing_shape(self, params: ResolvedOptions, size: tuple[int, int]) -> tuple[int, int]:
        """The (height, width) a photo of ``size`` is processed at with these options."""
        return processing_shape(*size, params.processing_size, self.limits.max_processing_pixels)

    def deadline(self) -> float:
        """The ``time.monotonic()`` deadline of an image submitted now."""
        return time.monotonic() + self.timeout_s

    # -- stages ------------------------------------------------------------------------------------

    async def _in_codec(
        self, fn: Callable[[], _T], client: Client | None, megapixels: float, finishing: bool
    ) -> tuple[_T, float]:
        """``fn`` on the codec threads in ``client``'s turn (:class:`CodecPool`), and its milliseconds."""
        start = time.perf_counter()
        key = (client or Client()).key
        value: _T = await asyncio.wrap_future(
            self._codec.submit(fn, key=key, megapixels=megapixels, finishing=finishing)
        )
        return value, (time.perf_counter() - start) * 1000

    async def probe(self, data: bytes, client: Client | None = None) -> ImageInfo:
        """The upload's format and size from its header (off the event loop); raises the
        :mod:`serving.images` errors for what is not an image we take, or is too large."""
        info, _ = await self._in_codec(
            lambda: probe(data, max_pixels=self.limits.max_pixels), client, 0.0, finishing=True
        )
        return info

    def check_output(self, params: ResolvedOptions, info: ImageInfo) -> None:
        """Refuse (:class:`OptionsError`) a requested output over the pixel budget or enlarged more
        than the upscale limit allows. The default output, the photo's own size, always passes."""
        out = output_shape((info.height, info.width), params.output_size)
        if out is None:
            return
        lim = self.limits
        if max(out) > lim.max_upscale * max(info.height, info.width):
            raise OptionsError(
                f"output_size {params.output_size} would enlarge a {info.width}×{info.height} photo "
                f"{max(out) / max(info.height, info.width):.1f} times; at most {lim.max_upscale:g} times"
            )
        if out[0] * out[1] > lim.max_output_pixels:
            raise OptionsError(
                f"output_size {params.output_size} makes a {out[1]}×{out[0]} result "
                f"({out[0] * out[1] / 1e6:.1f} MP); the limit is {lim.max_output_pixels / 1e6:.1f} MP"
            )

    def admit(
        self, params: ResolvedOptions, infos: list[ImageInfo], deadline: float, client: Client | None = None
    ) -> Admission:
        """Places in ``client``'s line for these images, priced by the pixels the models will run on,
        before any is decoded: :class:`~serving.tickets.QueueFullError` at once if there is no
        room (:class:`~serving.tickets.ClientQueueFullError` if the client's own share is full),
        or if they could not be done by ``deadline``."""
        pixels = [cost_pixels(*self.processing_shape(params, (i.height, i.width))) for i in infos]
        return self.engine.scheduler.admit(pixels, deadline, client)

    def release(self, admission: Admission) -> None:
        """Give back the room of admitted images that were not submitted."""
        self.engine.scheduler.release(admission)

    async def decode(
        self,
        data: bytes,
        params: ResolvedOptions,
        info: ImageInfo | None = None,
        deadline: float | None = None,
        client: Client | None = None,
    ) -> Decoded:
        """The upload ready for the pipeline (:class:`Decoded`), decoded off the event loop, within
        the budget of decoded pixels in flight: a decode waits while others hold it, until
        ``deadline`` at most (then 503 rather than a decode that could not be used in time)."""
        start = time.perf_counter()
        if info is None:
            info = await self.probe(data, client)
        size = (info.height, info.width)
        shape = self.processing_shape(params, size)
        # Twice the processing size: the area filter then averages at least 2×2 decoded pixels per
        # processing pixel. Measured on a 4032×3024 JPEG brought to 720×960: decoding at 1/2 took
        # 148 ms against 336 ms in full, the result within 1.1 levels (mean) of the full decode's;
        # decoding at 1/4 (just above the processing size) took 98 ms but differed by 2.0.
        needed = (2 * shape[0], 2 * shape[1]) if self.limits.reduced_decode else None
        # A decode holds what its decoder really allocates at its peak (every copy it makes).
        plan = plan_decode(info, needed)
        cost = plan.held
        if cost > self._decoding.capacity:
            raise ImageTooLargeError(
                f"decoding this {info.width}×{info.height} image holds {cost / 1e6:.1f} MP at once; the "
                f"limit of decoded pixels in flight is {self._decoding.capacity / 1e6:.1f} MP"
            )

        def prepare() -> np.ndarray | Tensor:
            if self.gpu_codec is not None and info.format == "jpeg":
                on_device = self.gpu_codec.decode(data, shape, max_pixels=self.limits.max_pixels)
                if on_device is not None:
                    return on_device
            image = decode(data, max_pixels=self.limits.max_pixels, needed=needed)
            return np.ascontiguousarray(resize_rgb(to_rgb_array(image.pixels), *shape))

        wait = None if deadline is None or math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        async with self._decoding.hold(cost, wait):
            pixels, _ = await self._in_codec(prepare, client, plan.held / 1e6, finishing=False)
        return Decoded(pixels, size, (time.perf_counter() - start) * 1000)

    def submit(
        self,
        params: ResolvedOptions,
        decoded: Decoded,
        deadline: float,
        admission: Admission | None = None,
        background: bool = False,
        client: Client | None = None,
    ) -> Ticket:
        """Queue the image on the engine's worker (into the place ``admission`` holds for it, if
        given; else in ``client``'s line); raises QueueFullError / SchedulerClosedError.
        ``background`` (job items): the worker's low-priority lines, which never refuse."""
        out_hw = output_shape(decoded.input_size, params.output_size)
        options = self.pipeline_options(
            params,
            input_size=decoded.input_size,
            output_size=out_hw,
            # The result stays on the device too when the GPU encoder will take it.
            device_result=self.gpu_codec is not None and params.format == "jpeg",
            # On the CPU the resize to the output size is codec work (encode): a 40 MP result takes
            # the worker 0.4-0.6 s that the next image's models can have.
            resize_later=True,
        )
        return self.engine.scheduler.submit(
            params.style,
            decoded.pixels,
            options,
            deadline,
            background=background,
            admission=admission,
            client=client,
        )

    async def wait(self, ticket: Ticket, watch: Callable[[Ticket], Awaitable[None]] | None = None) -> Result:
        """The ticket's result. Cancelling the caller cancels the ticket (counted ``cancelled``); at
        its deadline the ticket is dropped (counted ``deadline``) and :class:`DeadlineExceededError`
        raised. ``watch(ticket)`` runs beside the wait (:meth:`run`): if it raises, the ticket is
        cancelled and its error raised here at once."""
        fut = asyncio.wrap_future(ticket.future)
        fut.add_done_callback(_consume)
        timeout = None if math.isinf(ticket.deadline) else max(0.0, ticket.deadline - time.monotonic())
        watcher = asyncio.ensure_future(watch(ticket)) if watch is not None else None
        try:
            if watcher is not None:
                waits: set[asyncio.Future[Any]] = {fut, watcher}
                done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                failed = watcher.exception() if watcher in done else None
                if failed is not None and fut not in done:
                    ticket.cancel()
                    raise failed
                if not done:
                    raise TimeoutError
            timeout = None if math.isinf(ticket.deadline) else max(0.0, ticket.deadline - time.monotonic())
            result = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            ticket.expire()
            self.engine.scheduler.discard(ticket)
            raise DeadlineExceededError(
                f"no result within {self.timeout_s:g} s (queue wait included)"
            ) from None
        except asyncio.CancelledError:
            ticket.cancel()
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        self._on_result(result)
        return result

    async def encode(
        self, result: Result, params: ResolvedOptions, client: Client | None = None
    ) -> tuple[bytes, float]:
        """The result's image in the requested format (off the event loop, in ``client``'s turn), and
        the time it took (the resize to the output size included, when it was left to it)."""
        data, resize_ms, encode_ms = await self._encode(result, params, client)
        return data, resize_ms + encode_ms

    async def _encode(
        self, result: Result, params: ResolvedOptions, client: Client | None
    ) -> tuple[bytes, float, float]:
        """:meth:`encode`: the bytes, the milliseconds of the resize to the output size (0 when the
        pipeline made it) and of the encoding."""
        level = self.limits.png_compression
        gpu, on_device = self.gpu_codec, result.device_image
        resize_ms = 0.0

        def run() -> bytes:
            nonlocal resize_ms
            if gpu is not None and on_device is not None and params.format == "jpeg":
                data = gpu.encode(on_device, params.quality)
                if data is not None:
                    return data
            image = result.image
            if image.shape[:2] != result.output_size:  # left to us (Options.resize_later)
                start = time.perf_counter()
                image = np.ascontiguousarray(resize_rgb(image, *result.output_size))
                resize_ms = (time.perf_counter() - start) * 1000
            return encode(image, params.format, params.quality, level)

        h, w = result.output_size
        data, ms = await self._in_codec(run, client, h * w / 1e6, finishing=True)
        return data, resize_ms, ms - resize_ms

    async def finish(
        self, result: Result, params: ResolvedOptions, decoded: Decoded, ticket: Ticket
    ) -> Outcome:
        """Encode a result (in the ticket's client's turn) and put every timing together."""
        data, resize_ms, encode_ms = await self._encode(result, params, ticket.client)
        timings = {"decode": decoded.ms, "queue": ticket.queue_wait_ms}
        timings.update((s, result.timings_ms[s]) for s in STAGES)
        timings["resize_out"] += resize_ms
        timings["encode"] = encode_ms
        report = replace(result, image=_NO_PIXELS, device_image=None)
        return Outcome(report, data, params, {k: round(v, 3) for k, v in timings.items()})

    async def run(
        self,
        data: bytes,
        params: ResolvedOptions,
        deadline: float | None = None,
        client: Client | None = None,
        *,
        background: bool = False,
        watch: Callable[[Ticket], Awaitable[None]] | None = None,
    ) -> Outcome:
        """The whole flow for one image of ``client``: probe, admit, decode, submit, wait, encode.

        ``background`` (a job's item): no admission, the worker's low-priority lines. ``watch(ticket)``
        runs beside the wait; it may cancel the ticket (its job was cancelled), or raise, which stops
        the image and is raised here (its item was taken over).
        """
        outcomes = await self.run_many([data], params, deadline, client, background=background, watch=watch)
        outcome = outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def run_many(
        self,
        datas: Sequence[bytes],
        params: ResolvedOptions,
        deadline: float | None = None,
        client: Client | None = None,
        *,
        background: bool = False,
        watch: Callable[[Ticket], Awaitable[None]] | None = None,
    ) -> list[Outcome | ToonserveError]:
        """Several images of one request, with the same options: every one checked from its header,
        places asked for all of them at once (:class:`~serving.tickets.QueueFullError` /
        :class:`~serving.tickets.ClientQueueFullError` for the whole request, before anything is
        decoded), then each decoded and submitted, then all awaited together. Each entry is that
        image's outcome, or its own error: one bad file does not sink the others."""
        deadline = self.deadline() if deadline is None else deadline
        infos: list[ImageInfo | ToonserveError] = []
        for data in datas:
            try:
                info = await self.probe(data, client)
                self.check_output(params, info)
                infos.append(info)
            except ToonserveError as exc:
                infos.append(exc)
        admission = None
        if not background:
            admission = self.admit(params, [i for i in infos if isinstance(i, ImageInfo)], deadline, client)
        prepared: list[tuple[Decoded, Ticket] | ToonserveError] = []
        try:
            for data, probed in zip(datas, infos, strict=True):
                if isinstance(probed, ToonserveError):
                    prepared.append(probed)
                    continue
                try:
                    decoded = await self.decode(data, params, probed, deadline, client)
                    ticket = self.submit(params, decoded, deadline, admission, background, client)
                    prepared.append((decoded, ticket))
                except ToonserveError as exc:
                    prepared.append(exc)
        finally:
            if admission is not None:
                self.release(admission)
        # Each image's ticket (whose future holds its full-size result) is let go as soon as that image
        # is encoded, not when the whole request is.
        pending = dict(enumerate(prepared))
        del prepared

        async def one(index: int) -> Outcome:
            entry = pending.pop(index)
            if isinstance(entry, ToonserveError):
                raise entry
            decoded, ticket = entry
            return await self.finish(await self.wait(ticket, watch), params, decoded, ticket)

        done = await asyncio.gather(*(one(i) for i in range(len(pending))), return_exceptions=True)
        out: list[Outcome | ToonserveError] = []
        for item in done:
            if isinstance(item, BaseException) and not isinstance(item, ToonserveError):
                raise item
            out.append(item)
        return out


def _consume(fut: asyncio.Future[Result]) -> None:
    # A result nobody waits for any more (timed out, client gone) must not log "never retrieved".
    if not fut.cancelled():
        fut.exception()
