"""A clip through the flow: frame count, timestamps, rotation and audio kept, steadied frames close to
the frame-by-frame ones, and a run killed mid-clip resumed from its last segment."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.clips import write_test_clip
from inference.pipeline import Cartoonizer
from serving.clips import ClipFlow, ClipReport, chunk_spans
from serving.flow import Flow, Limits
from serving.options import RequestOptions, ResolvedOptions
from serving.scheduler import Scheduler
from serving.video import DEFAULT_LIMITS, NotAVideoError, join_segments, probe_video, read_frames
from tests.serving.engines import bare_engine

DEFAULTS = ResolvedOptions(style="anime", processing_size=192, format="png", quality=100)
FRAMES = 10


def _frames(n: int = FRAMES, step: int = 2) -> list[np.ndarray]:
    """A small portrait panning ``step`` pixels a frame, with sensor noise."""
    big = np.asarray(Image.fromarray(photos.astronaut()).resize((320, 320)))
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        window = big[0:200, 40 + step * i : 40 + step * i + 200].astype(np.float32)
        out.append(np.clip(window + rng.normal(0, 3, window.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture
def flow(cartoonizer: Cartoonizer) -> Iterator[Flow]:
    scheduler = Scheduler({"anime": cartoonizer}, name="test")
    scheduler.start()
    flow = Flow(
        bare_engine(cartoonizer, scheduler), DEFAULTS, limits=Limits(), timeout_s=120, codec_threads=1
    )
    yield flow
    flow.close()
    scheduler.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "in.mp4"
    write_test_clip(path, _frames(), fps=25, audio=True, quality=100)
    return path


def _run(clips: ClipFlow, source: Path, target: Path, **kw: object) -> ClipReport:
    params = clips.flow.options(RequestOptions())
    return asyncio.run(clips.run(source, target, params, **kw))  # type: ignore[arg-type]


@pytest.mark.slow  # about 2.5 s
def test_a_clip_keeps_its_frames_timestamps_and_audio(flow: Flow, clip: Path, tmp_path: Path) -> None:
    progress: list[tuple[int, int]] = []
    report = _run(
        ClipFlow(flow, DEFAULT_LIMITS),
        clip,
        tmp_path / "out.mp4",
        on_progress=lambda d, t: progress.append((d, t)),
    )
    out, source = probe_video(tmp_path / "out.mp4"), probe_video(clip)
    assert out.frames == source.frames == report.frames == FRAMES
    assert out.display_size == source.display_size == report.size
    assert out.has_audio and report.audio.action == "copied"
    assert [f.pts for f in read_frames(tmp_path / "out.mp4")] == [f.pts for f in read_frames(clip)]
    assert progress[0] == (0, FRAMES) and progress[-1] == (FRAMES, FRAMES)
    assert report.resumed_from == 0 and report.faces_max == 1
    assert not (tmp_path / ".out.mp4.parts").exists()  # the work folder is gone


@pytest.mark.slow  # two runs of the clip: about 5 s
def test_steady_frames_stay_close_to_the_frame_by_frame_ones(flow: Flow, clip: Path, tmp_path: Path) -> None:
    _run(ClipFlow(flow, DEFAULT_LIMITS), clip, tmp_path / "steady.mp4")
    _run(ClipFlow(flow, DEFAULT_LIMITS, steady=False), clip, tmp_path / "plain.mp4")
    steady = [f.rgb.astype(np.int16) for f in read_frames(tmp_path / "steady.mp4")]
    plain = [f.rgb.astype(np.int16) for f in read_frames(tmp_path / "plain.mp4")]
    assert np.array_equal(steady[0], plain[0])  # nothing to blend with yet
    assert max(float(np.abs(s - p).mean()) for s, p in zip(steady, plain, strict=True)) < 3.0


@pytest.mark.slow  # three runs of the clip: about 8 s
def test_a_killed_run_resumes_from_its_last_segment(flow: Flow, clip: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole.mp4"
    clips = ClipFlow(flow, DEFAULT_LIMITS, segment_s=0.12)  # 3 frames a segment at 25 fps
    _run(clips, clip, whole)

    class Killed(Exception):
        pass

    def die_at_seven(done: int, total: int) -> None:
        if done == 7:
            raise Killed

    work = tmp_path / "work"
    with pytest.raises(Killed):
        _run(clips, clip, tmp_path / "out.mp4", work=work, on_progress=die_at_seven)
    assert sorted(p.name for p in work.iterdir()) == ["seg-0000000-0000003.mp4", "seg-0000003-0000006.mp4"]
    report = _run(clips, clip, tmp_path / "out.mp4", work=work)
    assert report.resumed_from == 6 and report.frames == FRAMES
    again = [f.rgb.astype(np.int16) for f in read_frames(tmp_path / "out.mp4")]
    first = [f.rgb.astype(np.int16) for f in read_frames(whole)]
    assert len(again) == FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(again[:6], first[:6], strict=True))
    assert max(float(np.abs(a - b).mean()) for a, b in zip(again[6:], first[6:], strict=True)) < 3.0


def test_what_is_not_a_video_is_refused_before_any_work(flow: Flow, tmp_path: Path) -> None:
    photo = tmp_path / "photo.jpg"
    Image.fromarray(photos.astronaut()).save(photo)
    with pytest.raises(NotAVideoError):
        _run(ClipFlow(flow, DEFAULT_LIMITS), photo, tmp_path / "out.mp4")
    assert not (tmp_path / ".out.mp4.parts").exists()


@pytest.mark.slow  # a clip of 24 frames run whole and in two spans: about 8 s
def test_spans_run_apart_join_into_the_clip_run_whole(flow: Flow, tmp_path: Path) -> None:
    """Two spans (a video job's chunks, which two replicas may run) joined with the audio: every
    frame and timestamp, and the frames after the seam close to those of one run (the second span
    warmed up on the frames before it)."""
    frames = 24
    source = write_test_clip(tmp_path / "in.mp4", _frames(frames), fps=25, audio=True, quality=100)
    clips = ClipFlow(flow, DEFAULT_LIMITS)
    _run(clips, source, tmp_path / "whole.mp4")
    seam = 13
    progress: list[tuple[int, int]] = []
    first = _run(clips, source, tmp_path / "a.mp4", span=(0, seam), audio=False)
    second = _run(
        clips, source, tmp_path / "b.mp4", span=(seam, frames), audio=False,
        on_progress=lambda d, t: progress.append((d, t)),
    )  # fmt: skip
    assert (first.frames, second.frames, second.resumed_from) == (seam, frames - seam, seam)
    assert progress[0] == (0, frames - seam) and progress[-1] == (frames - seam, frames - seam)
    assert not probe_video(tmp_path / "b.mp4").has_audio
    join_segments([tmp_path / "a.mp4", tmp_path / "b.mp4"], tmp_path / "joined.mp4", source)
    joined = probe_video(tmp_path / "joined.mp4")
    assert (joined.frames, joined.has_audio) == (frames, True)
    assert [f.pts for f in read_frames(tmp_path / "joined.mp4")] == [f.pts for f in read_frames(source)]
    apart = [f.rgb.astype(np.int16) for f in read_frames(tmp_path / "joined.mp4")]
    together = [f.rgb.astype(np.int16) for f in read_frames(tmp_path / "whole.mp4")]
    assert all(np.array_equal(a, b) for a, b in zip(apart[:seam], together[:seam], strict=True))
    after = [float(np.abs(a - b).mean()) for a, b in zip(apart[seam:], together[seam:], strict=True)]
    print("mean level difference after the seam:", [round(x, 2) for x in after])
    assert max(after) < 1.0, after


@pytest.mark.parametrize(
    ("frames", "fps", "chunk_s", "expected"),
    [
        (12, 25.0, 0.2, [(0, 5), (5, 12)]),  # a last piece of 2 joins the one before
        (15, 25.0, 0.2, [(0, 5), (5, 10), (10, 15)]),
        (13, 25.0, 0.2, [(0, 5), (5, 10), (10, 13)]),  # 3 ≥ half a chunk: a chunk of its own
        (4, 25.0, 10.0, [(0, 4)]),
        (600, 0.0, 10.0, [(0, 250), (250, 600)]),  # no rate: 250 frames; 100 left join the last
        (1, 30.0, 0.01, [(0, 1)]),
    ],
)
def test_a_clip_is_cut_into_chunks_of_about_the_chunk_time(
    frames: int, fps: float, chunk_s: float, expected: list[tuple[int, int]]
) -> None:
    assert chunk_spans(frames, fps, chunk_s) == expected
