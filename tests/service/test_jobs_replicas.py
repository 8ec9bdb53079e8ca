"""Two replicas on one Redis and one data directory: a job posted to one is followed, run and served by
the other, which also finishes the items of the first after it is killed (``kill -9``); a clip's
chunks are shared by both and its clip served by either."""

from __future__ import annotations

import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.clips import write_test_clip
from devkit.redis_server import RedisServer
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env
from serving.video import probe_video, read_frames
from tests.service.test_jobs_live import _photo_set, _post

pytestmark = pytest.mark.live

#: Short, so the test sees a takeover soon; runners renew every second.
LEASE_S = 3
QUEUE = "{toonserve}:queue:anime:anonymous"  # the stream of the anime jobs of clients without keys
PHOTOS = 12


@pytest.fixture
def replicas(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer
) -> Iterator[list[LiveService]]:
    services = []
    for name in ("a", "b"):
        env = service_env(
            model_dir.path.parent,
            tmp_path,
            TOONSERVE_CACHE_DIR=str(tmp_path / f"cache-{name}"),
            TOONSERVE_DATA_DIR=str(tmp_path / "data"),  # shared, as a ReadWriteMany volume would be
            TOONSERVE_JOBS_BACKEND="redis",
            TOONSERVE_REDIS_URL=redis_server.url,
            TOONSERVE_JOB_LEASE_S=str(LEASE_S),
            # Smaller than the default 720: the same code path at a fraction of the time.
            TOONSERVE_PROCESSING_SIZE="320",
            # A clip's chunks of half a second: a short clip is many items for both replicas.
            TOONSERVE_VIDEO_CHUNK_S="0.5",
        )
        services.append(LiveService(env, tmp_path / f"server-{name}.log"))
    starting = [threading.Thread(target=s.start) for s in services]
    for t in starting:
        t.start()
    for t in starting:
        t.join()
    for s in services:
        assert s.proc is not None and s.proc.poll() is None, s.log_tail()
    yield services
    for s in services:
        s.stop()


def _events(url: str, out: list[tuple[str, dict[str, Any]]]) -> None:
    event = ""
    with httpx.stream("GET", url, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                out.append((event, json.loads(line[6:])))


def test_a_job_survives_the_replica_that_took_it(
    replicas: list[LiveService], redis_server: RedisServer
) -> None:
    a, b = replicas
    runner_a = a.runner_id()
    files = _photo_set(PHOTOS)
    status, body = _post(a.url + "/jobs", files, "images", {})
    assert status == 202, body
    job_id = json.loads(body)["id"]

    events: list[tuple[str, dict[str, Any]]] = []
    follower = threading.Thread(target=_events, args=(f"{b.url}/jobs/{job_id}/events", events), daemon=True)
    follower.start()

    # Interactive requests on B keep being answered the whole time, before and after A dies.
    interactive: list[int] = []
    stop = threading.Event()
    portrait = io.BytesIO()
    Image.fromarray(photos.grace_hopper()).resize((192, 224)).save(portrait, "JPEG")

    def ask() -> None:
        with httpx.Client(timeout=120) as http:
            while not stop.is_set():
                r = http.post(b.url + "/cartoonize", files={"image": ("p.jpg", portrait.getvalue())})
                interactive.append(r.status_code)

    asker = threading.Thread(target=ask, daemon=True)
    asker.start()

    # Progress made on A (and B) shows on B; A holds items when it dies.
    redis = redis_server.client()
    deadline = time.monotonic() + 120
    while True:
        job = b.job(job_id)
        held = redis.xpending_range(QUEUE, "runners", "-", "+", 10, consumername=runner_a)
        if job["done"] >= 2 and held:
            break
        assert time.monotonic() < deadline and job["status"] != "succeeded", (job, held)
        time.sleep(0.02)
    a.kill()
    killed_at = time.monotonic()
    a.proc = None
    held_entries = {h["message_id"] for h in held}
    items = {int(k): json.loads(v) for k, v in redis.hgetall(f"{{toonserve}}:items:{job_id}").items()}
    held_by_a = [i for i, item in items.items() if item.get("entry") in held_entries]
    assert held_by_a and job["done"] < PHOTOS, (held, items)

    deadline = time.monotonic() + 300
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = b.job(job_id)
    stop.set()
    asker.join(180)
    follower.join(30)
    assert job["status"] == "succeeded" and job["done"] == PHOTOS and job["failed"] == 0, job
    assert all(job["items"][i]["status"] == "ok" for i in held_by_a)  # finished by B, A being dead
    assert time.monotonic() - killed_at >= LEASE_S  # they waited out A's lease
    assert (
        redis.xpending(QUEUE, "runners")["pending"] == 0 and int(redis.get("{toonserve}:waiting") or 0) == 0
    )

    assert len(interactive) >= 3 and set(interactive) == {200}, interactive
    names = [e for e, _ in events]
    assert names[0] == "job" and names[-1] == "end" and events[-1][1]["status"] == "succeeded"
    assert names.count("item") + events[0][1]["done"] == PHOTOS

    status, zipped = b.get(f"/jobs/{job_id}/result")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        names = [n for n in zf.namelist() if n != "results.json"]
        assert len(names) == len(set(names)) == PHOTOS
        results = {n.split("-", 1)[1].rsplit(".", 1)[0]: zf.read(n) for n in names}
    assert sorted(results) == sorted(name.rsplit(".", 1)[0] for name, _ in files)
    for name, data in files:
        status, expected = _post(b.url + "/cartoonize", [(name, data)], "image", {})
        assert status == 200
        ours = np.asarray(Image.open(io.BytesIO(results[name.rsplit(".", 1)[0]])))
        theirs = np.asarray(Image.open(io.BytesIO(expected)))
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def _frames_written(service: LiveService) -> float:
    status, body = service.get("/metrics")
    assert status == 200
    line = next(x for x in body.decode().splitlines() if x.startswith("toonserve_video_frames_total "))
    return float(line.split()[1])


def test_two_replicas_share_one_clip(replicas: list[LiveService], tmp_path: Path) -> None:
    a, b = replicas
    big = np.asarray(Image.fromarray(photos.astronaut()).resize((260, 200)))
    frames = [np.ascontiguousarray(big[20:180, 2 * i : 2 * i + 160]) for i in range(50)]
    clip = write_test_clip(tmp_path / "walk.mp4", frames, fps=10, audio=True, quality=90)
    r = httpx.post(a.url + "/jobs", files={"video": ("walk.mp4", clip.read_bytes())}, timeout=60)
    assert r.status_code == 202, r.text
    job = r.json()
    assert [(i["first_frame"], i["frames"]) for i in job["items"]] == [(k, 5) for k in range(0, 50, 5)]
    deadline = time.monotonic() + 300
    while (job := b.job(job["id"]))["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
    assert job["status"] == "succeeded" and job["done"] == job["total"] == 50, job
    written = (_frames_written(a), _frames_written(b))
    assert sum(written) == 50 and min(written) > 0, written  # each replica ran some of the chunks
    status, body = b.get(f"/jobs/{job['id']}/result", timeout=60)
    assert status == 200
    (tmp_path / "toon.mp4").write_bytes(body)
    info = probe_video(tmp_path / "toon.mp4")
    assert (info.frames, info.has_audio) == (50, True)
    assert [f.pts for f in read_frames(tmp_path / "toon.mp4")] == [f.pts for f in read_frames(clip)]
