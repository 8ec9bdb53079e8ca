"""/jobs through the app on the Redis backend: the same cases as tests/api/test_jobs.py (the routes
and the runner cannot tell the stores apart), then what only a shared store meets: Redis going away
and coming back, a replica handing its items back when it stops, and one that lost a chunk to
another leaving that one's work alone."""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.clips import pattern_frames, write_test_clip
from devkit.redis_server import RedisServer
from devkit.reference_graphs import ReferenceModelDir
from devkit.tcp_proxy import TcpProxy
from jobs.files import SEGMENTS
from jobs.redis import RedisJobStore
from service.app import create_app
from serving.clips import ClipReport
from serving.video import probe_video, read_frames
from tests.api import test_jobs as cases
from tests.api import test_video_jobs as video_cases
from tests.api.conftest import jobs_settings, service_state, small_jpeg, wait_ready

pytestmark = pytest.mark.live


def _redis_client(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer, settings: dict[str, object]
) -> Iterator[TestClient]:
    """The app with ``settings`` on the Redis backend, ready: every client fixture of this module."""
    overrides = {**settings, "jobs_backend": "redis", "redis_url": redis_server.url}
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, **overrides))) as client:
        wait_ready(client)
        assert isinstance(service_state(client).jobs.store, RedisJobStore)
        yield client


@pytest.fixture
def jobs_client(
    model_dir: ReferenceModelDir, tmp_path: Path, request: pytest.FixtureRequest, redis_server: RedisServer
) -> Iterator[TestClient]:
    yield from _redis_client(model_dir, tmp_path, redis_server, getattr(request, "param", {}))


receiver = cases.receiver

# The backend-dependent cases of the SQLite module, run again here with the fixture above.
test_life_cycle_with_a_bad_file = cases.test_life_cycle_with_a_bad_file
test_idempotency_key = cases.test_idempotency_key
test_events_stream_then_a_late_listener = cases.test_events_stream_then_a_late_listener
test_cancel_stops_a_running_item_between_stages = cases.test_cancel_stops_a_running_item_between_stages
test_upload_limit_and_quota_refuse_before_writing = cases.test_upload_limit_and_quota_refuse_before_writing
test_ended_jobs_expire_with_their_files = cases.test_ended_jobs_expire_with_their_files
test_webhook_is_signed_and_retried = cases.test_webhook_is_signed_and_retried
test_metrics_count_jobs_and_items = cases.test_metrics_count_jobs_and_items


@pytest.fixture
def video_client(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer
) -> Iterator[TestClient]:
    yield from _redis_client(model_dir, tmp_path, redis_server, video_cases.VIDEO_SETTINGS)


clip = video_cases.clip
# A video job on the shared store: its claim carries the frame count, progress is recorded by the
# PROGRESS script while the runner holds the item, and a cancel stops it.
test_a_clip_becomes_a_cartoon_clip = (
    video_cases.test_a_clip_becomes_a_cartoon_clip_with_its_frames_timing_and_audio
)
test_a_cancelled_video_job_stops = video_cases.test_a_cancelled_video_job_stops_and_keeps_no_result


@pytest.fixture
def side_by_side_client(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer
) -> Iterator[TestClient]:
    yield from _redis_client(model_dir, tmp_path, redis_server, video_cases.SIDE_BY_SIDE_SETTINGS)


# A chunk that fails on the shared store: the FAIL script ends the chunk running beside it too (its
# lease goes), and the usage counters come back to zero.
test_a_chunk_that_fails_fails_its_job = video_cases.test_a_chunk_that_fails_fails_its_job_and_keeps_nothing


def _files(n: int = 1) -> list[tuple[str, tuple[str, bytes]]]:
    return [("images", (f"{i}.jpg", small_jpeg(photos.astronaut(), 160 + 16 * i))) for i in range(n)]


def test_redis_away_then_back(
    jobs_client: TestClient, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """While Redis is unreachable the jobs routes answer 503 and everything else works; the runner
    keeps trying and takes work again once Redis is back."""
    caplog.set_level(logging.WARNING, logger="jobs.runner")
    redis_server.kill()
    r = jobs_client.post("/jobs", files=_files())
    assert r.status_code == 503 and r.json()["error"]["code"] == "job_store_unavailable", r.text
    assert "cannot be reached" in r.json()["error"]["message"]
    assert jobs_client.get("/jobs/" + "0" * 32).status_code == 503
    assert jobs_client.get("/jobs").status_code == 503
    photo = small_jpeg(photos.grace_hopper())
    assert jobs_client.post("/cartoonize", files={"image": ("p.jpg", photo)}).status_code == 200
    assert jobs_client.get("/metrics").status_code == 200
    deadline = time.monotonic() + 10
    while not any("taking work failed" in rec.getMessage() for rec in caplog.records):
        assert time.monotonic() < deadline, "the runner never noticed"
        time.sleep(0.1)

    redis_server.start()  # the same port, empty
    job = jobs_client.post("/jobs", files=_files(2)).json()
    done = cases._wait_job(jobs_client, job["id"], timeout=90)
    assert done["status"] == "succeeded" and done["done"] == 2 and done["failed"] == 0
    assert all(not t.done() for t in service_state(jobs_client).jobs.runner._tasks)


def test_a_stopping_replica_hands_its_items_back_at_once(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A graceful stop does not leave its running items to their lease: another replica can take
    them right away."""
    from inference.pipeline import Cartoonizer

    real_detect = Cartoonizer.detect
    started = threading.Event()

    def slow_detect(self: Cartoonizer, job: Any) -> None:
        started.set()
        time.sleep(3)
        real_detect(self, job)

    monkeypatch.setattr(Cartoonizer, "detect", slow_detect)
    settings = jobs_settings(
        model_dir, tmp_path, jobs_backend="redis", redis_url=redis_server.url, request_timeout_s=0.5
    )
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        job = client.post("/jobs", files=_files(2)).json()
        assert started.wait(30)
    other = RedisJobStore(tmp_path / "data", redis_server.url, lease_s=3600.0, replica="other")
    stored = other.get(job["id"])
    assert stored is not None and "running" not in [i.status for i in stored.items], stored
    claim = other.claim({"anime"}, "another-runner")  # no lease to wait for
    assert claim is not None and claim.job_id == job["id"]


@pytest.mark.slow  # a 200-frame clip through the models, in two runs: about 10 s
def test_a_replica_that_lost_its_chunk_removes_only_its_own_folder(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Replica A runs a clip's chunk and loses Redis (a network partition) for longer than the lease;
    replica B takes the chunk over, and A's complete segments with it, into a folder of its own. When
    A reaches Redis again it finds it lost its claim and removes its own folder, only: B's segments
    stay, B resumes after them, and the chunk's output is the whole clip with its timestamps."""
    caplog.set_level(logging.WARNING, logger="jobs.runner")
    proxy = TcpProxy("127.0.0.1", redis_server.port).start()  # A's way to Redis, which the test cuts
    settings = jobs_settings(
        model_dir,
        tmp_path,
        jobs_backend="redis",
        redis_url=proxy.url(),
        # A never takes the chunk back: B, not a runner here, does not renew its lease.
        job_lease_s=3600.0,
        job_concurrency=1,
        processing_size=128,
        video_chunk_s=100.0,  # the clip is one chunk
    )
    # 5 frames a second: a segment (about 2 s of the clip) is 10 frames, and A is far from done with
    # the clip when it has one.
    frames = 200
    source = write_test_clip(tmp_path / "walk.mp4", pattern_frames(frames, 128, 96), fps=5, quality=90)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post("/jobs", files={"video": ("walk.mp4", source.read_bytes())})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        data = Path(service_state(client).jobs.store.data_dir)
        chunk = data / "jobs" / job_id / "work" / "0000"
        deadline = time.monotonic() + 120
        while not list(chunk.glob(f"*/{SEGMENTS}/seg-*.mp4")):
            assert time.monotonic() < deadline, client.get(f"/jobs/{job_id}").json()
            time.sleep(0.02)
        (a_dir,) = chunk.iterdir()

        # A loses Redis: it runs on, unable to renew its lease. B (lease 0.5 s) takes the chunk over
        # once A's lease has gone by, and its claim's folder takes A's complete segments.
        proxy.cut()
        b = RedisJobStore(data, redis_server.url, lease_s=0.5, replica="b")
        deadline = time.monotonic() + 30
        while (taken := b.claim({"anime"}, "runner-b")) is None:
            assert time.monotonic() < deadline, "B could not take the chunk over"
            time.sleep(0.02)
        assert taken.job_id == job_id and taken.index == 0
        b_dir = b.claim_dir(taken)
        assert b_dir.parent == chunk and b_dir != a_dir
        adopted = sorted(p.name for p in (b_dir / SEGMENTS).glob("seg-*.mp4"))
        assert adopted and adopted[0].startswith("seg-0000000-"), adopted
        assert all((b_dir / SEGMENTS / name).samefile(a_dir / SEGMENTS / name) for name in adopted)
        resume_at = int(adopted[-1].split("-")[2].split(".")[0])
        assert 0 < resume_at < frames

        # A reaches Redis again, finds out at its next renewal and lets its own folder go.
        proxy.restore()

        # (It removes the folder, then says so: both are awaited.)
        def told() -> bool:
            return any("no longer this runner's" in rec.getMessage() for rec in caplog.records)

        deadline = time.monotonic() + 60
        while a_dir.exists() or not told():
            assert time.monotonic() < deadline, f"A kept its folder ({a_dir.exists()}) or said nothing"
            time.sleep(0.02)
        assert sorted(p.name for p in (b_dir / SEGMENTS).glob("seg-*.mp4")) == adopted
        assert sum(len(list(read_frames(b_dir / SEGMENTS / name))) for name in adopted) == resume_at

        # B runs the chunk on (with this process's engine: the same models as A's) and records it.
        runner = service_state(client).jobs.runner
        assert runner.clips is not None
        params = runner.flow.options(taken.options)
        result = b_dir / "result.mp4"
        run = functools.partial(
            runner.clips.run, taken.input_path, result, params, work=b_dir / SEGMENTS,
            span=(0, frames), audio=False,
        )  # fmt: skip
        report: ClipReport = client.portal.call(run)  # type: ignore[union-attr]
        assert (report.resumed_from, report.frames) == (resume_at, frames)
        job = b.finish(taken, "ok", result=result, ttl_s=3600)
        assert job is not None and job.status == "succeeded"
        assert not chunk.exists()  # the holder that recorded the chunk let every claim's folder go

        r = client.get(f"/jobs/{job_id}/result")
        assert r.status_code == 200, r.text
        out = tmp_path / "toon.mp4"
        out.write_bytes(r.content)
        assert probe_video(out).frames == frames
        assert [f.pts for f in read_frames(out)] == [f.pts for f in read_frames(source)]
        b.close()
    proxy.close()
