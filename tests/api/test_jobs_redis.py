"""/jobs through the app on the Redis backend: the same cases as tests/api/test_jobs.py (the routes
and the runner cannot tell the stores apart), then what only a shared store meets: Redis going away
and coming back, and a replica handing its items back when it stops."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.redis_server import RedisServer
from devkit.reference_graphs import ReferenceModelDir
from jobs.redis import RedisJobStore
from service.app import create_app
from tests.api import test_jobs as cases
from tests.api import test_video_jobs as video_cases
from tests.api.conftest import jobs_settings, service_state, small_jpeg, wait_ready

pytestmark = pytest.mark.live


@pytest.fixture
def jobs_client(
    model_dir: ReferenceModelDir, tmp_path: Path, request: pytest.FixtureRequest, redis_server: RedisServer
) -> Iterator[TestClient]:
    overrides = {**getattr(request, "param", {}), "jobs_backend": "redis", "redis_url": redis_server.url}
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, **overrides))) as client:
        wait_ready(client)
        assert isinstance(service_state(client).jobs.store, RedisJobStore)
        yield client


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
    overrides = {"jobs_backend": "redis", "redis_url": redis_server.url, **video_cases.VIDEO_SETTINGS}
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, **overrides))) as client:
        wait_ready(client)
        assert isinstance(service_state(client).jobs.store, RedisJobStore)
        yield client


clip = video_cases.clip
# A video job on the shared store: its claim carries the frame count, progress is recorded by the
# PROGRESS script while the runner holds the item, and a cancel stops it.
test_a_clip_becomes_a_cartoon_clip = (
    video_cases.test_a_clip_becomes_a_cartoon_clip_with_its_frames_timing_and_audio
)
test_a_cancelled_video_job_stops = video_cases.test_a_cancelled_video_job_stops_and_keeps_no_result


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
