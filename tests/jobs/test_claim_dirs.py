"""A video item's claims each work in a folder of their own (``work/NNNN/<attempt>/``): a new claim
takes the complete segments that earlier claims left (hard links, copies where links cannot be made),
so it resumes where they stopped; a claim's own folder can go without touching the others'; the
holder that records the item lets them all go.

The runner's side (a replica that lost its claim removes its own folder, while the one that took the
chunk over finishes it) is in tests/api/test_jobs_redis.py."""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
from pathlib import Path

import pytest

from devkit.clips import pattern_frames, write_test_clip
from jobs.files import SEGMENTS, remove_tree
from jobs.sqlite import SQLiteJobStore
from jobs.store import Claim, Upload
from serving.clips import ClipFlow, resumable_segments
from serving.flow import Flow
from serving.options import ResolvedOptions
from serving.video import DEFAULT_LIMITS, VideoWriter, join_segments, probe_video, read_frames
from tests.jobs.test_store import QUOTA, TTL
from tests.serving import test_clips

OPTIONS = ResolvedOptions(style="anime", processing_size=192, format="png", quality=90)
FRAMES = 12

flow = test_clips.flow  # the request flow over the reference models, for the run that resumes


def _video_job(store: SQLiteJobStore, job_id: str, source: Path) -> None:
    """A video job of one chunk: the whole clip."""
    with source.open("rb") as data:
        upload = Upload(source.name, data, source.stat().st_size, None, 1 << 20, frames=FRAMES)
        _, created = store.create(
            job_id, OPTIONS, [upload], webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=QUOTA
        )
    assert created


def _claim(store: SQLiteJobStore, owner: str) -> Claim:
    claim = store.claim({"anime"}, owner)
    assert claim is not None and claim.frames == FRAMES
    return claim


def _restart(store: SQLiteJobStore) -> None:
    """What a restart after ``kill -9`` does: the item left running is queued again."""
    assert store.recover() == 1


def _segment(folder: Path, source: Path, first: int, end: int) -> Path:
    """Frames ``first``–``end`` (exclusive) of ``source`` as a complete segment, written as a clip's
    run writes one: encoded under a temporary name, renamed once complete."""
    info = probe_video(source)
    part = folder / f"seg-{first:07d}.part"
    with VideoWriter(part, info, quality=OPTIONS.quality) as writer:
        for frame in itertools.islice(read_frames(source, first), end - first):
            writer.write(frame.rgb, frame.pts, info.time_base, frame.duration)
    return part.rename(folder / f"seg-{first:07d}-{end:07d}.mp4")


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return write_test_clip(tmp_path / "walk.mp4", pattern_frames(FRAMES), fps=25, quality=90)


def test_a_new_claim_links_the_complete_segments_of_earlier_claims(tmp_path: Path, source: Path) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    job_id = "c" * 32
    _video_job(store, job_id, source)
    chunk = store.work_dir(job_id, 0)

    # A first claim writes one segment, and the process dies.
    first = _claim(store, "runner-1")
    first_dir = store.claim_dir(first)
    assert first_dir.parent == chunk and first_dir.name == first.attempt
    assert _names(first_dir) == []  # nothing earlier to take
    (first_dir / SEGMENTS).mkdir()
    _segment(first_dir / SEGMENTS, source, 0, 3)
    _restart(store)

    # The second takes it, writes one more, dies while it writes a third.
    second = _claim(store, "runner-2")
    second_dir = store.claim_dir(second)
    assert second.attempt != first.attempt and second_dir != first_dir
    assert _names(second_dir / SEGMENTS) == ["seg-0000000-0000003.mp4"]
    assert (second_dir / SEGMENTS / "seg-0000000-0000003.mp4").samefile(
        first_dir / SEGMENTS / "seg-0000000-0000003.mp4"
    )
    _segment(second_dir / SEGMENTS, source, 3, 6)
    (second_dir / SEGMENTS / "seg-0000006.part").write_bytes(b"half a segment")
    _restart(store)

    # The third takes the longest run of complete segments one earlier claim left: the second's.
    third = _claim(store, "runner-3")
    third_dir = store.claim_dir(third)
    taken = third_dir / SEGMENTS
    assert _names(taken) == ["seg-0000000-0000003.mp4", "seg-0000003-0000006.mp4"]
    assert [end for _, end, _ in resumable_segments(taken)] == [3, 6]
    assert all((taken / name).samefile(second_dir / SEGMENTS / name) for name in _names(taken))
    assert _names(chunk) == sorted([first.attempt, second.attempt, third.attempt])

    # Earlier claims' folders going (as a runner that finds it lost its claim lets its own go) leave
    # the third's whole.
    sizes = {name: (taken / name).stat().st_size for name in _names(taken)}
    remove_tree(first_dir)
    remove_tree(second_dir)
    assert {name: (taken / name).stat().st_size for name in _names(taken)} == sizes
    assert [len(list(read_frames(taken / name))) for name in _names(taken)] == [3, 3]

    # The third finishes the chunk; the holder that records it lets every folder of the chunk go.
    _segment(taken, source, 6, FRAMES)
    result = third_dir / "result.mp4"
    join_segments([path for _, _, path in resumable_segments(taken)], result)
    job = store.finish(third, "ok", result=result, ttl_s=TTL)
    assert job is not None and job.status == "succeeded"
    assert not chunk.exists()
    out = store.result_path(job_id, 0, "mp4")
    assert probe_video(out).frames == FRAMES
    assert [f.pts for f in read_frames(out)] == [f.pts for f in read_frames(source)]
    store.close()


def test_segments_are_copied_where_the_file_system_cannot_link(
    tmp_path: Path, source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    job_id = "d" * 32
    _video_job(store, job_id, source)
    first = _claim(store, "runner-1")
    first_dir = store.claim_dir(first)
    (first_dir / SEGMENTS).mkdir()
    made = _segment(first_dir / SEGMENTS, source, 0, 3)
    _restart(store)

    def no_links(src: object, dst: object, *args: object, **kwargs: object) -> None:
        raise PermissionError(errno.EPERM, "Operation not permitted")  # as on some network shares

    monkeypatch.setattr(os, "link", no_links)
    second_dir = store.claim_dir(_claim(store, "runner-2"))
    copy = second_dir / SEGMENTS / made.name
    assert _names(second_dir / SEGMENTS) == [made.name]  # no temporary file left beside it
    assert not copy.samefile(made) and copy.read_bytes() == made.read_bytes()
    remove_tree(first_dir)
    assert len(list(read_frames(copy))) == 3
    store.close()


def test_a_claim_of_a_deleted_job_makes_no_folder(tmp_path: Path, source: Path) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    job_id = "e" * 32
    _video_job(store, job_id, source)
    claim = _claim(store, "runner-1")
    assert store.delete(job_id)
    with pytest.raises(FileNotFoundError):
        store.claim_dir(claim)
    assert not store.files.job_dir(job_id).exists()
    store.close()


def test_a_second_claim_resumes_from_the_segments_of_the_first(
    flow: Flow, tmp_path: Path, source: Path
) -> None:
    """A claim stopped mid-chunk (its process killed), then the chunk claimed again after the
    restart: the new claim's run starts after the first one's last complete segment, and the chunk's
    result has every frame, with the clip's timestamps."""
    store = SQLiteJobStore(tmp_path / "data")
    job_id = "f" * 32
    _video_job(store, job_id, source)
    clips = ClipFlow(flow, DEFAULT_LIMITS, segment_s=0.12)  # 3 frames a segment at 25 fps
    params = flow.options(OPTIONS)

    class Killed(Exception):
        pass

    def die_at_seven(done: int, total: int) -> None:
        if done == 7:
            raise Killed

    def run(claim: Claim, **kw: object) -> tuple[Path, int]:
        work = store.claim_dir(claim)
        report = asyncio.run(
            clips.run(
                claim.input_path, work / "result.mp4", params, work=work / SEGMENTS,
                span=(0, FRAMES), audio=False, **kw,  # type: ignore[arg-type]
            )
        )  # fmt: skip
        assert report.frames == FRAMES
        return work / "result.mp4", report.resumed_from

    first = _claim(store, "runner-1")
    with pytest.raises(Killed):
        run(first, on_progress=die_at_seven)
    first_segments = store.work_dir(job_id, 0) / first.attempt / SEGMENTS
    assert _names(first_segments) == ["seg-0000000-0000003.mp4", "seg-0000003-0000006.mp4"]
    _restart(store)

    second = _claim(store, "runner-2")
    result, resumed_from = run(second)
    assert resumed_from == 6  # after the first claim's last complete segment, not from frame 0
    job = store.finish(second, "ok", result=result, ttl_s=TTL)
    assert job is not None and job.status == "succeeded"
    assert not store.work_dir(job_id, 0).exists()
    out = store.result_path(job_id, 0, "mp4")
    assert probe_video(out).frames == FRAMES
    assert [f.pts for f in read_frames(out)] == [f.pts for f in read_frames(source)]
    store.close()
