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

Seen before (:mod:`serving.result_cache`): every upload is hashed with its header read; a photo the
same client sent before with the same style, weights and processing size is finished from the stages
kept then (strength, resize, encode: :func:`~inference.pipeline.finish_stages`), and one that is
being worked on for that client (the same photo twice in a batch or a job, or two requests at once)
waits for that work rather than doing it again (a request does not wait on a job item, which the
worker may take only later). Such an outcome is a ``hit``; the others are ``miss``.

Traces: when spans are exported (:mod:`serving.tracing`), every image's decode, queue, pipeline
stages and encode become spans below the work's own (the request's, the job item's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, TypeVar

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
from inference.pipeline import AbandonedError, Options, Result, Stages, finish_stages
from serving import tracing
from serving.codec_pool import CodecPool
from serving.cost import cost_pixels
from serving.encoding import DEFAULT_PNG_COMPRESSION, encode, png_writer
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
from serving.log_context import trace_var
from serving.options import RequestOptions, ResolvedOptions
from serving.result_cache import CacheKey, ResultCache
from serving.tickets import Admission, Cancellable, Client, DeadlineExceededError, QueueFullError, Ticket

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
    #: When the decode began (Unix-epoch nanoseconds), for its span.
    start_ns: int = 0


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
    #: ``hit``: made from the stages of an earlier or concurrent run of the same photo for the same
    #: client (the models did not run for it); ``miss``: the models ran.
    cache: Literal["hit", "miss"] = "miss"
    #: SHA-256 of the uploaded bytes, hex (what :meth:`Flow.tag` is derived from).
    photo_sha256: str = ""


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
    #: PNG's zlib level (0–9), and the most threads one PNG is compressed on.
    png_compression: int = DEFAULT_PNG_COMPRESSION
    png_threads: int = 1


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


@dataclass(frozen=True)
class _Photo:
    """An upload checked from its header, with what identifies its model work."""

    data: bytes
    info: ImageInfo
    digest: str
    key: CacheKey


class _Waiting:
    """An image waiting for the same photo's work in flight; its owner may cancel it, as a ticket."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _InFlight:
    """A photo the models are working on: its stages once known (None: the work failed or was
    dropped; whoever waited does it again), and whether it is a job item's."""

    future: asyncio.Future[Stages | None]
    background: bool


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
        cache: ResultCache | None = None,
        tag_salt: str = "",
    ) -> None:
        """``defaults``: what a request gets for the options it leaves out. ``gpu_codec``: decode and
        encode the JPEGs it takes on the engine's device (None: Pillow). ``cache``: the stages of
        recent photos (None: none kept; photos in flight are still shared). ``tag_salt``: mixed into
        every :meth:`tag`, so that changing it invalidates every tag given out."""
        self.engine = engine
        self.cache = cache if cache is not None else ResultCache(0)
        self.tag_salt = tag_salt
        self._inflight: dict[CacheKey, _InFlight] = {}
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

    async def codec(self, fn: Callable[[], _T], client: Client | None, megapixels: float) -> _T:
        """``fn`` on the codec threads, in ``client``'s turn: decode and encode work of other kinds
        (a clip's frames), shared with every photo's."""
        value, _ = await self._in_codec(fn, client, megapixels, finishing=False)
        return value

    async def probe(self, data: bytes, client: Client | None = None) -> ImageInfo:
        """The upload's format and size from its header (off the event loop); raises the
        :mod:`serving.images` errors for what is not an image we take, or is too large."""
        info, _ = await self._in_codec(
            lambda: probe(data, max_pixels=self.limits.max_pixels), client, 0.0, finishing=True
        )
        return info

    async def digest(self, data: bytes, client: Client | None = None) -> str:
        """SHA-256 of an upload, hex (off the event loop): what identifies the photo."""
        value, _ = await self._in_codec(
            lambda: hashlib.sha256(data).hexdigest(), client, len(data) / 4e6, finishing=True
        )
        return value

    async def _identify(
        self, data: bytes, client: Client | None, digest: str | None
    ) -> tuple[ImageInfo, str]:
        """The upload's header (:meth:`probe`) and its SHA-256, in one trip to the codec threads."""

        def run() -> tuple[ImageInfo, str]:
            info = probe(data, max_pixels=self.limits.max_pixels)
            return info, digest or hashlib.sha256(data).hexdigest()

        value, _ = await self._in_codec(run, client, 0.0, finishing=True)
        return value

    def cache_key(self, params: ResolvedOptions, digest: str, client: Client | None) -> CacheKey:
        """What makes this photo's model work the same as another's (:class:`CacheKey`)."""
        store = self.engine.store
        return CacheKey(
            client=(client or Client()).key,
            photo=digest,
            style=params.style,
            version=store.get(params.style).version,
            processing_size=params.processing_size,
            device=str(store.device),
            dtype=store.precision_of(params.style).name,
        )

    def tag(self, params: ResolvedOptions, digest: str, *parts: str) -> str:
        """An opaque tag (32 hex digits) of the image this flow makes of the photo whose SHA-256 is
        ``digest`` with ``params``: it changes with the photo, any option, the style's weights, the
        device and dtype, the server's limits that shape a result, and the salt; ``parts`` add what
        else the caller's representation depends on. Needs the style loaded."""
        store = self.engine.store
        lim = self.limits
        fields = [
            self.tag_salt,
            digest,
            params.model_dump_json(),
            store.get(params.style).version,
            str(store.device),
            str(store.precision_of(params.style).dtype),
            f"{lim.max_processing_pixels}/{lim.min_face_size}/{lim.max_faces}/{lim.png_compression}",
            png_writer(lim.png_compression),
            *parts,
        ]
        return opaque_tag(*fields)

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
        start, start_ns = time.perf_counter(), tracing.now_ns()
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
        return Decoded(pixels, size, (time.perf_counter() - start) * 1000, start_ns)

    def submit(
        self,
        params: ResolvedOptions,
        decoded: Decoded,
        deadline: float,
        admission: Admission | None = None,
        background: bool = False,
        client: Client | None = None,
        **extra: Any,
    ) -> Ticket:
        """Queue the image on the engine's worker (into the place ``admission`` holds for it, if
        given; else in ``client``'s line); raises QueueFullError / SchedulerClosedError.
        ``background`` (job items): the worker's low-priority lines, which never refuse. ``extra``:
        more of the pipeline's options (a clip's frame: its ``tracker`` and ``time_s``)."""
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
            # What the models made of it, for the result cache (on the CPU it costs one 8-bit copy).
            keep_stages=extra.pop(
                "keep_stages", self.cache.enabled or self.engine.store.device.type == "cpu"
            ),
            **extra,
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

    async def wait(
        self, ticket: Ticket, watch: Callable[[Cancellable], Awaitable[None]] | None = None
    ) -> Result:
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
        h, w = result.output_size
        (data, resize_ms), ms = await self._in_codec(
            lambda: self._encode_now(result, params), client, h * w / 1e6, finishing=True
        )
        return data, resize_ms, ms - resize_ms

    def _encode_now(self, result: Result, params: ResolvedOptions) -> tuple[bytes, float]:
        """Encode on this thread: the bytes, and the milliseconds of the resize to the output size
        when it was left to the encoder (``Options.resize_later``; else 0)."""
        gpu, on_device = self.gpu_codec, result.device_image
        if gpu is not None and on_device is not None and params.format == "jpeg":
            data = gpu.encode(on_device, params.quality)
            if data is not None:
                return data, 0.0
        image, resize_ms = result.image, 0.0
        if image.shape[:2] != result.output_size:  # left to us (Options.resize_later)
            start = time.perf_counter()
            image = np.ascontiguousarray(resize_rgb(image, *result.output_size))
            resize_ms = (time.perf_counter() - start) * 1000
        lim = self.limits
        return encode(image, params.format, params.quality, lim.png_compression, lim.png_threads), resize_ms

    async def finish(
        self, result: Result, params: ResolvedOptions, decoded: Decoded, ticket: Ticket, digest: str = ""
    ) -> Outcome:
        """Encode a result (in the ticket's client's turn) and put every timing together."""
        encode_start = tracing.now_ns()
        data, resize_ms, encode_ms = await self._encode(result, params, ticket.client)
        timings = {"decode": decoded.ms, "queue": ticket.queue_wait_ms}
        timings.update((s, result.timings_ms[s]) for s in STAGES)
        timings["resize_out"] += resize_ms
        timings["encode"] = encode_ms
        if tracing.exporting():
            _emit_spans(result, decoded, ticket, encode_start, encode_ms)
        report = replace(result, image=_NO_PIXELS, device_image=None, stages=None)
        return Outcome(report, data, params, {k: round(v, 3) for k, v in timings.items()}, "miss", digest)

    async def _from_stages(
        self, stages: Stages, params: ResolvedOptions, photo: _Photo, client: Client | None
    ) -> Outcome:
        """The outcome of a photo whose model work is done (:class:`Stages` cached or just made for
        another request): strength, resize and encode, in one trip to the codec threads."""
        out_hw = output_shape(stages.input_size, params.output_size)
        options = self.pipeline_options(
            params, input_size=stages.input_size, output_size=out_hw, resize_later=True
        )
        start_ns = tracing.now_ns()

        def run() -> tuple[Result, bytes, float, float]:
            result = finish_stages(stages, options)
            start = time.perf_counter()
            data, resize_ms = self._encode_now(result, params)
            return result, data, resize_ms, (time.perf_counter() - start) * 1000 - resize_ms

        h, w = out_hw or stages.input_size
        (result, data, resize_ms, encode_ms), _ = await self._in_codec(
            run, client, h * w / 1e6, finishing=True
        )
        self.cache.count_hit()
        timings = {"decode": 0.0, "queue": 0.0, **result.timings_ms, "encode": encode_ms}
        timings["resize_out"] += resize_ms
        if tracing.exporting():
            parent = trace_var.get()
            at = start_ns
            for stage in ("strength", "resize_out", "encode"):
                end = at + round(timings[stage] * 1e6)
                tracing.emit_child(parent, stage, at, end, attributes={"toonserve.cache": "hit"})
                at = end
        self._on_result(result)
        report = replace(result, image=_NO_PIXELS, stages=None)
        return Outcome(
            report, data, params, {k: round(v, 3) for k, v in timings.items()}, "hit", photo.digest
        )

    async def run(
        self,
        data: bytes,
        params: ResolvedOptions,
        deadline: float | None = None,
        client: Client | None = None,
        *,
        background: bool = False,
        watch: Callable[[Cancellable], Awaitable[None]] | None = None,
        digest: str | None = None,
    ) -> Outcome:
        """The whole flow for one image of ``client``: probe, admit, decode, submit, wait, encode.

        ``background`` (a job's item): no admission, the worker's low-priority lines. ``watch(ticket)``
        runs beside the wait; it may cancel the ticket (its job was cancelled), or raise, which stops
        the image and is raised here (its item was taken over). ``digest``: the upload's SHA-256 when
        the caller already has it (:meth:`digest`).
        """
        outcomes = await self.run_many(
            [data],
            params,
            deadline,
            client,
            background=background,
            watch=watch,
            digests=None if digest is None else [digest],
        )
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
        watch: Callable[[Cancellable], Awaitable[None]] | None = None,
        digests: Sequence[str] | None = None,
    ) -> list[Outcome | ToonserveError]:
        """Several images of one request, with the same options: every one checked from its header,
        places asked for all of them at once (:class:`~serving.tickets.QueueFullError` /
        :class:`~serving.tickets.ClientQueueFullError` for the whole request, before anything is
        decoded), then each decoded and submitted, then all awaited together. Each entry is that
        image's outcome, or its own error: one bad file does not sink the others.

        A photo whose model work is cached, or in flight for this client (the same photo earlier in
        this request among them), is finished from it instead: it takes no place in the line
        (module docstring)."""
        deadline = self.deadline() if deadline is None else deadline
        photos: list[_Photo | ToonserveError] = []
        for i, data in enumerate(datas):
            try:
                info, digest = await self._identify(data, client, digests[i] if digests else None)
                self.check_output(params, info)
                photos.append(_Photo(data, info, digest, self.cache_key(params, digest, client)))
            except ToonserveError as exc:
                photos.append(exc)
        # What each photo needs: a plan of ("hit", stages), ("follow", future) or ("lead", future).
        plans: list[tuple[str, Any] | ToonserveError] = []
        led: dict[CacheKey, asyncio.Future[Stages | None]] = {}
        for photo in photos:
            if isinstance(photo, ToonserveError):
                plans.append(photo)
                continue
            stages = self.cache.get(photo.key) if self.cache.enabled else None
            shared = self._inflight.get(photo.key)
            if stages is not None and stages.serves(params.no_face):
                plans.append(("hit", stages))
            elif photo.key in led:
                plans.append(("follow", led[photo.key]))
            elif shared is not None and (background or not shared.background):
                plans.append(("follow", shared.future))
            else:
                future: asyncio.Future[Stages | None] = asyncio.get_running_loop().create_future()
                self._inflight[photo.key] = _InFlight(future, background)
                led[photo.key] = future
                plans.append(("lead", future))
        leading = [
            photo.info
            for photo, plan in zip(photos, plans, strict=True)
            if isinstance(photo, _Photo) and not isinstance(plan, ToonserveError) and plan[0] == "lead"
        ]
        admission = None
        prepared: list[tuple[Decoded, Ticket] | ToonserveError | None] = []
        try:
            if not background and leading:
                admission = self.admit(params, leading, deadline, client)
            for photo, plan in zip(photos, plans, strict=True):
                if not isinstance(photo, _Photo) or isinstance(plan, ToonserveError) or plan[0] != "lead":
                    prepared.append(None)
                    continue
                try:
                    decoded = await self.decode(photo.data, params, photo.info, deadline, client)
                    ticket = self.submit(params, decoded, deadline, admission, background, client)
                    prepared.append((decoded, ticket))
                except ToonserveError as exc:
                    self._settle(photo.key, None)
                    prepared.append(exc)
        except BaseException:
            for key in led:
                self._settle(key, None)
            raise
        finally:
            if admission is not None:
                self.release(admission)
        # Each image's ticket (whose future holds its full-size result) is let go as soon as that image
        # is encoded, not when the whole request is.
        pending = dict(enumerate(zip(photos, plans, prepared, strict=True)))
        del prepared

        async def one(index: int) -> Outcome:
            photo, plan, entry = pending.pop(index)
            if isinstance(photo, ToonserveError):
                raise photo
            if isinstance(entry, ToonserveError):
                raise entry
            assert not isinstance(plan, ToonserveError)
            kind, value = plan
            if kind == "hit":
                return await self._from_stages(value, params, photo, client)
            if kind == "follow":
                return await self._follow(value, params, photo, deadline, client, background, watch)
            assert entry is not None
            decoded, ticket = entry
            try:
                result = await self.wait(ticket, watch)
            except BaseException:
                self._settle(photo.key, None)
                raise
            if result.stages is not None:
                if self.cache.enabled:
                    self.cache.put(photo.key, result.stages)
                self.cache.count_miss()
            self._settle(photo.key, result.stages)
            return await self.finish(result, params, decoded, ticket, photo.digest)

        done = await asyncio.gather(*(one(i) for i in range(len(pending))), return_exceptions=True)
        out: list[Outcome | ToonserveError] = []
        for item in done:
            if isinstance(item, BaseException) and not isinstance(item, ToonserveError):
                raise item
            out.append(item)
        return out

    def _settle(self, key: CacheKey, stages: Stages | None) -> None:
        """The work on ``key`` is over: hand its stages (None: none) to whoever waits for them."""
        shared = self._inflight.pop(key, None)
        if shared is not None and not shared.future.done():
            shared.future.set_result(stages)

    async def _follow(
        self,
        future: asyncio.Future[Stages | None],
        params: ResolvedOptions,
        photo: _Photo,
        deadline: float,
        client: Client | None,
        background: bool,
        watch: Callable[[Cancellable], Awaitable[None]] | None,
    ) -> Outcome:
        """Wait for the same photo's model work in flight, and finish from its stages; when that
        work fails or was dropped, or its stages cannot serve these options, do it here. ``watch``
        watches the wait as it would a ticket's (:meth:`wait`): it may cancel it, or raise."""
        timeout = None if math.isinf(deadline) else max(0.0, deadline - time.monotonic())
        waiting = _Waiting()
        shared = asyncio.ensure_future(asyncio.shield(future))
        stopped = asyncio.ensure_future(waiting.cancelled.wait())
        watcher = asyncio.ensure_future(watch(waiting)) if watch is not None else None
        try:
            waits: set[asyncio.Future[Any]] = {shared, stopped}
            if watcher is not None:
                waits.add(watcher)
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if shared not in done:
                if watcher is not None and watcher in done and (failed := watcher.exception()) is not None:
                    raise failed
                if waiting.cancelled.is_set():
                    raise AbandonedError("the work was cancelled before its image was finished")
                try:
                    # The watcher ended without a word: wait on for the work itself.
                    left = None if timeout is None else max(0.0, deadline - time.monotonic())
                    stages = await asyncio.wait_for(shared, left if done else 0)
                except TimeoutError:
                    raise DeadlineExceededError(
                        f"no result within {self.timeout_s:g} s (queue wait included)"
                    ) from None
            else:
                stages = shared.result()
        finally:
            for task in (shared, stopped, watcher):
                if task is not None:
                    task.cancel()
        if stages is not None and stages.serves(params.no_face):
            return await self._from_stages(stages, params, photo, client)
        return await self.run(
            photo.data, params, deadline, client, background=background, watch=watch, digest=photo.digest
        )


def opaque_tag(*parts: str) -> str:
    """32 hex digits that change with any of ``parts`` (the SHA-256 of them, NUL-separated): the one
    way the service derives an entity tag from what identifies a representation."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


def _emit_spans(
    result: Result, decoded: Decoded, ticket: Ticket, encode_start: int, encode_ms: float
) -> None:
    """The spans of one image the models ran on, below the current work's span: decode, queue (from
    when it was submitted to its first stage), each pipeline stage as it ran, encode."""
    parent = trace_var.get()
    if parent is None:
        return
    decode_end = decoded.start_ns + round(decoded.ms * 1e6)
    tracing.emit_child(parent, "decode", decoded.start_ns, decode_end)
    first = result.stage_times[0][1] if result.stage_times else decode_end
    tracing.emit_child(parent, "queue", first - round(ticket.queue_wait_ms * 1e6), first)
    for stage, start, end in result.stage_times:
        tracing.emit_child(parent, stage, start, end)
    tracing.emit_child(parent, "encode", encode_start, encode_start + round(encode_ms * 1e6))


def _consume(fut: asyncio.Future[Result]) -> None:
    # A result nobody waits for any more (timed out, client gone) must not log "never retrieved".
    if not fut.cancelled():
        fut.exception()
