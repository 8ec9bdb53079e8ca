"""A clip through the one request flow: a cartoon clip out, steadier than its frames cartoonized one by
one.

:class:`ClipFlow` reads the clip's frames with PyAV (:mod:`serving.video`), brings each to its
processing size and submits it to the engine's worker like a photo (:meth:`Flow.submit`), with the
clip's :class:`~inference.tracking.FaceTracker` in its options, so its faces are tracked and their
landmarks smoothed (the head crops do not jitter), and its shot number, so a cut starts new tracks.
A few frames are in flight at once, so the worker never waits for a decode or an encode. Each result
comes back at the processing size with the stages the models made
(:class:`~inference.pipeline.Stages`); the clip's :class:`~inference.temporal.Steadier` blends it
with the previous output along the optical flow of the input frames, it is brought to the output
size and encoded, in order, on the flow's codec threads.

Crash-safe: the frames are encoded in segments of about ``segment_s`` seconds in a work folder, each
written under a temporary name and renamed once complete. A run over a work folder that holds
complete segments from an earlier run (a process killed mid-clip) starts after the last of them,
its steadier primed with that segment's last frame, so it resumes rather than starts over. At the
end the segments are joined by copying their packets, with the input's audio, into the output
(:func:`serving.video.join_segments`), and the work folder is removed.

A run may cover a *span* of the clip's frames (a chunk of a video job, which replicas share): it
writes only those frames, and, unless it resumes from its own segments, starts
:data:`WARMUP_FRAMES` frames earlier, running them through the models, the tracker and the steadier
without writing them, so its first frames agree with the previous span's last ones as if the clip
had run in one go (the steadier's memory of the frames before fades as 0.7 a frame: after 8 frames,
6 % of it is left).
"""

from __future__ import annotations

import contextlib
import functools
import math
import shutil
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import numpy as np

from inference.geometry import resize_rgb
from inference.pipeline import Result, finish_stages
from inference.temporal import Steadier, is_cut
from inference.tracking import FaceTracker
from serving.flow import Decoded, Flow, output_shape
from serving.options import ResolvedOptions
from serving.tickets import Cancellable, Client, Ticket
from serving.video import (
    AudioOutcome,
    VideoFrame,
    VideoInfo,
    VideoLimits,
    VideoWriter,
    join_segments,
    probe_video,
    read_frames,
)

#: About how long each crash-safe segment is: what a resumed clip does again at most.
DEFAULT_SEGMENT_S: Final = 2.0
#: About how long a video job's chunks are: the work one replica takes at a time. Ten seconds is 250
#: frames at 25 fps, so the chunk's :data:`WARMUP_FRAMES` cost 3 %, and a five-minute clip is 30
#: chunks that every replica (and every free slot of one) can share.
DEFAULT_CHUNK_S: Final = 10.0
#: Frames in flight at once between decode, the worker and the encoder.
_IN_FLIGHT: Final = 3
#: Frames run before a span that starts mid-clip (and does not resume from its own segments), so its
#: tracker and steadier start where an uninterrupted run would be.
WARMUP_FRAMES: Final = 8
_SEGMENT_SUFFIX: Final = ".mp4"


@dataclass(frozen=True)
class ClipReport:
    """What a clip run did: frames written (all of its span, those of a resumed run's earlier segments
    included), the frame it resumed from (its span's first frame: from the start), the output's size,
    what became of the audio, the milliseconds spent per step in this run (decode, model: queue and
    pipeline, steady, resize, encode) and its frames per second (warm-up frames not counted)."""

    frames: int
    resumed_from: int
    size: tuple[int, int]
    audio: AudioOutcome
    timings_ms: dict[str, float]
    frames_per_s: float
    faces_max: int = 0


@dataclass(frozen=True)
class _Span:
    """What one run reads and writes: frames from ``read_from`` are run, those from ``write_from``
    to ``end`` (exclusive) written; progress counts from ``first`` (the span's first frame)."""

    read_from: int
    write_from: int
    end: int
    first: int


@dataclass
class _Totals:
    ms: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("decode", "model", "steady", "resize", "encode"), 0.0)
    )
    faces_max: int = 0


def chunk_spans(frames: int, fps: float, chunk_s: float = DEFAULT_CHUNK_S) -> list[tuple[int, int]]:
    """A clip's frames cut into chunks of about ``chunk_s`` seconds at ``fps`` (250 frames when the
    rate is unknown): ``[(first, end), …]`` covering ``0…frames``; a last piece under half a chunk
    joins the one before."""
    size = max(1, round(fps * chunk_s)) if fps > 0 else 250
    spans = [(first, min(first + size, frames)) for first in range(0, frames, size)]
    if len(spans) > 1 and spans[-1][1] - spans[-1][0] < size / 2:
        last = spans.pop()
        spans[-1] = (spans[-1][0], last[1])
    return spans


def _segments(work: Path) -> list[tuple[int, int, Path]]:
    """The complete segments in ``work``: (first frame, end frame, path), in order. A segment is
    complete once it has its final name (``seg-<first>-<end>.mp4``, renamed from a ``.part``)."""
    found = []
    for path in work.glob(f"seg-*{_SEGMENT_SUFFIX}"):
        parts = path.stem.split("-")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            found.append((int(parts[1]), int(parts[2]), path))
    return sorted(found)


def resumable_segments(work: Path, first: int = 0) -> list[tuple[int, int, Path]]:
    """The complete segments in ``work`` that continue each other from frame ``first`` (a gap or an
    overlap ends them): (first frame, end frame, path), in order. A run over ``work`` resumes after
    the last of them; a video job's new claim of a chunk takes them from its earlier claims' folders
    by the same rule (:meth:`jobs.files.JobFiles.claim_dir`)."""
    kept, at = [], first
    for start, end, path in _segments(work):
        if start != at or end <= start:
            break
        kept.append((start, end, path))
        at = end
    return kept


class ClipFlow:
    """Clips through the one request flow (module docstring)."""

    def __init__(
        self,
        flow: Flow,
        limits: VideoLimits,
        *,
        steady: bool = True,
        segment_s: float = DEFAULT_SEGMENT_S,
    ) -> None:
        """``steady``: track faces and steady the frames (False: each frame on its own, as upstream's
        video script does; for comparison)."""
        self.flow = flow
        self.limits = limits
        self.steady = steady
        self.segment_s = segment_s

    async def probe(self, source: Path, client: Client | None = None) -> VideoInfo:
        """The clip's header: :mod:`serving.video`'s errors for what is not a video we take."""
        return await self.flow.codec(lambda: probe_video(source, self.limits), client, 0.0)

    async def run(
        self,
        source: Path,
        target: Path,
        params: ResolvedOptions,
        *,
        work: Path | None = None,
        client: Client | None = None,
        background: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        watch: Callable[[Cancellable], Awaitable[None]] | None = None,
        span: tuple[int, int] | None = None,
        audio: bool = True,
    ) -> ClipReport:
        """Cartoonize the clip at ``source`` into the MP4 ``target`` with ``params`` (``quality`` is
        the video's; ``output_size`` its long side), resuming from the complete segments in ``work``
        (default: a folder beside ``target``). ``on_progress(done, total)`` after each frame written
        (of the span); ``watch`` as for a photo (:meth:`Flow.wait`). ``span``: only frames
        ``[first, end)`` (module docstring); ``audio``: the input's audio beside them (a span's
        output is joined with the others, and the audio, later)."""
        started = time.perf_counter()
        info = await self.probe(source, client)
        first, end = span if span is not None else (0, info.frames)
        if not 0 <= first < end <= info.frames:
            raise ValueError(f"span {first}–{end} is not within the clip's {info.frames} frames")
        work = work if work is not None else target.with_name(f".{target.name}.parts")
        work.mkdir(parents=True, exist_ok=True)
        for stale in work.glob("*.part"):  # what a killed run was writing
            stale.unlink()
        done = resumable_segments(work, first)
        resume = done[-1][1] if done else first
        # A span that starts mid-clip warms up on the frames before it (a resumed one is primed).
        warm_from = max(0, first - WARMUP_FRAMES) if resume == first else resume
        width, height = info.display_size
        out_hw = output_shape((height, width), params.output_size) or (height, width)
        processing = self.flow.processing_shape(params, (height, width))
        per_segment = max(1, round(float(info.fps) * self.segment_s)) if info.fps else 50
        totals = _Totals()
        steadier = Steadier() if self.steady else None
        tracker = FaceTracker() if self.steady else None
        if resume > first and steadier is not None:
            await self._prime(steadier, source, done[-1][2], resume, processing, client)
        if on_progress is not None:
            on_progress(resume - first, end - first)
        segments = [path for _, _, path in done]
        if resume < end:
            segments += await self._frames(
                source, info, params, work, _Span(warm_from, resume, end, first), per_segment,
                processing, out_hw, steadier, tracker, totals, client, background, on_progress, watch,
            )  # fmt: skip
        with_audio = source if audio else None
        outcome = await self.flow.codec(lambda: join_segments(segments, target, with_audio), client, 0.0)
        shutil.rmtree(work, ignore_errors=True)
        elapsed = time.perf_counter() - started
        return ClipReport(
            frames=end - first,
            resumed_from=resume,
            size=(out_hw[1], out_hw[0]),
            audio=outcome,
            timings_ms={k: round(v, 1) for k, v in totals.ms.items()},
            frames_per_s=(end - resume) / elapsed if elapsed > 0 else 0.0,
            faces_max=totals.faces_max,
        )

    async def _prime(
        self,
        steadier: Steadier,
        source: Path,
        segment: Path,
        resume: int,
        processing: tuple[int, int],
        client: Client | None,
    ) -> None:
        """Start the steadier where the last complete segment ended: its last output frame (as
        encoded) and the input frame it was made from, both at the processing size."""

        def last_frames() -> tuple[np.ndarray, np.ndarray]:
            out = None
            for frame in read_frames(segment, limits=self.limits):
                out = frame.rgb
            photo = next(read_frames(source, resume - 1, limits=self.limits)).rgb
            assert out is not None, f"segment {segment.name} has no frame"
            return resize_rgb(photo, *processing), resize_rgb(out, *processing)

        photo, out = await self.flow.codec(last_frames, client, 0.0)
        steadier.prime(np.ascontiguousarray(photo), np.ascontiguousarray(out))

    async def _frames(
        self,
        source: Path,
        info: VideoInfo,
        params: ResolvedOptions,
        work: Path,
        span: _Span,
        per_segment: int,
        processing: tuple[int, int],
        out_hw: tuple[int, int],
        steadier: Steadier | None,
        tracker: FaceTracker | None,
        totals: _Totals,
        client: Client | None,
        background: bool,
        on_progress: Callable[[int, int], None] | None,
        watch: Callable[[Cancellable], Awaitable[None]] | None,
    ) -> list[Path]:
        """The span's frames through the worker, steadied, and those to write encoded into segments;
        their paths."""
        frames: Iterator[VideoFrame] = read_frames(source, span.read_from, limits=self.limits)
        megapixels = info.width * info.height / 1e6
        size = (info.display_size[1], info.display_size[0])
        written: list[Path] = []
        writer: VideoWriter | None = None
        segment_start = span.write_from
        pending: deque[tuple[VideoFrame, np.ndarray, Ticket]] = deque()
        previous: np.ndarray | None = None
        shot = 0

        def next_frame() -> tuple[VideoFrame, np.ndarray] | None:
            began = time.perf_counter()
            frame = next(frames, None)
            if frame is None or frame.index >= span.end:
                return None
            small = np.ascontiguousarray(resize_rgb(frame.rgb, *processing))
            totals.ms["decode"] += (time.perf_counter() - began) * 1000
            return frame, small

        def finish_segment() -> None:
            nonlocal writer
            if writer is None:
                return
            writer.close()
            final = work / f"seg-{segment_start:07d}-{segment_start + writer.frames:07d}{_SEGMENT_SUFFIX}"
            writer.path.rename(final)
            written.append(final)
            writer = None

        def emit(frame: VideoFrame, result: Result) -> None:
            nonlocal writer, segment_start
            began = time.perf_counter()
            out = result.image
            stages = result.stages
            assert stages is not None
            if out.shape[:2] != stages.photo.shape[:2]:
                # Resized on the device already (a GPU): the processing-size frame from the stages.
                options = self.flow.pipeline_options(params, input_size=size, resize_later=True)
                out = finish_stages(stages, options).image
            if steadier is not None:
                out = steadier(stages.photo, out)
            now = time.perf_counter()
            totals.ms["steady"] += (now - began) * 1000
            if frame.index < span.write_from:
                return  # a warm-up frame: it went through the tracker and the steadier only
            if out.shape[:2] != out_hw:
                out = np.ascontiguousarray(resize_rgb(out, *out_hw))
            began, now = now, time.perf_counter()
            totals.ms["resize"] += (now - began) * 1000
            if writer is None:
                segment_start = frame.index
                part = work / f"seg-{frame.index:07d}.part"
                writer = VideoWriter(part, info, quality=params.quality, size=(out_hw[1], out_hw[0]))
            writer.write(out, frame.pts, info.time_base, frame.duration)
            totals.ms["encode"] += (time.perf_counter() - now) * 1000
            if writer.frames >= per_segment:
                finish_segment()

        try:
            while True:
                item = await self.flow.codec(next_frame, client, megapixels)
                if item is not None:
                    frame, small = item
                    if previous is not None and is_cut(previous, small):
                        shot += 1
                    previous = small
                    decoded = Decoded(small, size, 0.0)
                    ticket = self.flow.submit(
                        params, decoded, math.inf, background=background, client=client,
                        tracker=tracker, time_s=frame.time_s, shot=shot, keep_stages=True,
                    )  # fmt: skip
                    pending.append((frame, small, ticket))
                if pending and (item is None or len(pending) >= _IN_FLIGHT):
                    frame, _, ticket = pending.popleft()
                    began = time.perf_counter()
                    result = await self.flow.wait(ticket, watch)
                    totals.ms["model"] += (time.perf_counter() - began) * 1000
                    totals.faces_max = max(totals.faces_max, result.faces_stylized)
                    await self.flow.codec(functools.partial(emit, frame, result), client, megapixels)
                    if on_progress is not None and frame.index >= span.write_from:
                        on_progress(frame.index + 1 - span.first, span.end - span.first)
                if item is None and not pending:
                    break
            await self.flow.codec(finish_segment, client, 0.0)
        except BaseException:
            for _, _, ticket in pending:
                ticket.cancel()
            if writer is not None:
                writer.abort()
            raise
        finally:
            close = getattr(frames, "close", None)
            if close is not None:
                # Cancelled while a codec thread is inside the generator: it is left to be collected.
                with contextlib.suppress(ValueError):
                    close()
        return written
