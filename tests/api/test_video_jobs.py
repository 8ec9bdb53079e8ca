"""Video jobs through the app: a clip in, its cartoon clip out (frames, timing, size, audio kept),
frames counted as they are written, progress events, cancel, a chunk that fails, and clips refused
before anything is stored."""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devkit import photos
from devkit.clips import damage_packet, pattern_frames, write_test_clip
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from serving.video import probe_video, read_frames
from tests.api.conftest import jobs_settings, service_state, small_jpeg, sse_events, wait_ready

pytestmark = pytest.mark.slow  # each test runs a clip through the models

FRAMES = 12


def _frames(n: int = FRAMES, side: int = 160) -> list[np.ndarray]:
    """A portrait panning two pixels a frame, with sensor noise."""
    big = np.asarray(Image.fromarray(photos.astronaut()).resize((side + 2 * n + 40, side + 40)))
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        window = big[20 : 20 + side, 20 + 2 * i : 20 + 2 * i + side].astype(np.float32)
        out.append(np.clip(window + rng.normal(0, 3, window.shape), 0, 255).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "me.mp4"
    return write_test_clip(path, _frames(), fps=25, audio=True, quality=90)


#: Small frames, a frame limit the refused clip goes over, and chunks of 5 frames at 25 fps (the
#: 12-frame clip is two chunks: 0–4 and 5–11, the last piece of 2 joining the one before).
VIDEO_SETTINGS: dict[str, object] = {"processing_size": 128, "max_video_frames": 200, "video_chunk_s": 0.2}


def _client(
    model_dir: ReferenceModelDir, tmp_path: Path, settings: dict[str, object]
) -> Iterator[TestClient]:
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, **settings))) as client:
        wait_ready(client)
        yield client


@pytest.fixture
def video_client(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(model_dir, tmp_path, VIDEO_SETTINGS)


#: Chunks of 50 frames (2 s at 25 fps), two of them running side by side.
SIDE_BY_SIDE_SETTINGS: dict[str, object] = {**VIDEO_SETTINGS, "video_chunk_s": 2.0, "job_concurrency": 2}


@pytest.fixture
def side_by_side_client(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[TestClient]:
    yield from _client(model_dir, tmp_path, SIDE_BY_SIDE_SETTINGS)


def _wait(client: TestClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not end: {client.get(f'/jobs/{job_id}').json()}")


def test_a_clip_becomes_a_cartoon_clip_with_its_frames_timing_and_audio(
    video_client: TestClient, clip: Path, tmp_path: Path
) -> None:
    r = video_client.post("/jobs", files={"video": ("me.mp4", clip.read_bytes())}, data={"quality": "100"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "video" and (job["total"], job["done"]) == (FRAMES, 0)
    assert [(i["first_frame"], i["frames"]) for i in job["items"]] == [(0, 5), (5, 7)]
    assert r.headers["location"] == f"/jobs/{job['id']}"

    with video_client.stream("GET", f"/jobs/{job['id']}/events") as events:
        seen = sse_events(events.iter_lines())
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "job" and kinds[-1] == "end", kinds
    dones = [data["done"] for kind, data in seen if kind == "progress"]
    assert dones == sorted(dones) and all(0 < d <= FRAMES for d in dones)
    job = seen[-1][1]
    assert job["status"] == "succeeded" and (job["total"], job["done"], job["failed"]) == (FRAMES, FRAMES, 0)
    items = job["items"]
    assert [(i["status"], i["frames_done"]) for i in items] == [("ok", 5), ("ok", 7)]
    assert all(i["timings_ms"]["encode"] > 0 and i["result_url"] is None for i in items)

    result = video_client.get(f"/jobs/{job['id']}/result")
    assert result.status_code == 200 and result.headers["content-type"] == "video/mp4"
    assert result.headers["etag"] and 'filename="001-me.mp4"' in result.headers["content-disposition"]
    chunk = video_client.get(f"/jobs/{job['id']}/items/1")
    assert chunk.status_code == 409 and "frames 5–11 of a clip" in chunk.json()["error"]["message"]
    again = video_client.get(f"/jobs/{job['id']}/result", headers={"If-None-Match": result.headers["etag"]})
    assert again.status_code == 304
    part = video_client.get(f"/jobs/{job['id']}/result", headers={"Range": "bytes=0-99"})
    assert part.status_code == 206 and len(part.content) == 100  # a player seeks

    out = tmp_path / "toon.mp4"
    out.write_bytes(result.content)
    src, got = probe_video(clip), probe_video(out)
    assert (got.frames, got.width, got.height, got.has_audio) == (FRAMES, src.width, src.height, True)
    assert got.fps == Fraction(25) and got.codec == "h264"
    # Lossless at quality 100: a cartoon, not the photo, in every frame.
    photo_frames = [f.rgb.astype(int) for f in read_frames(clip)]
    toon_frames = [f.rgb.astype(int) for f in read_frames(out)]
    assert all(np.abs(t - p).mean() > 5 for t, p in zip(toon_frames, photo_frames, strict=True))

    # The job's folder holds the joined clip only: the upload, the chunks' results and their segments
    # went once it was joined.
    data = Path(video_client.app.state.toonserve.jobs.store.data_dir)  # type: ignore[attr-defined]
    left = _files_under(data / "jobs" / job["id"])
    assert left == ["out/clip.mp4"], left


def _files_under(folder: Path) -> list[str]:
    """The files under a job's folder, relative to it, while the service may be deleting them: a
    folder that goes between being listed and being read is skipped (os.walk ignores it; rglob would
    raise FileNotFoundError)."""
    return sorted(
        (Path(top) / name).relative_to(folder).as_posix()
        for top, _, names in os.walk(folder)
        for name in names
    )


def test_refused_clips_get_their_code_before_anything_is_stored(
    video_client: TestClient, clip: Path, tmp_path: Path
) -> None:
    data = clip.read_bytes()
    cases = {
        "a photo": (small_jpeg(photos.astronaut()), 415, "unsupported_video"),
        "text": (b"hello, not a video", 415, "unsupported_video"),
        "truncated": (data[: len(data) // 3], 400, "corrupt_video"),
        "empty": (b"", 400, "corrupt_video"),
    }
    long_clip = write_test_clip(tmp_path / "long.mp4", _frames(4) * 60, fps=25, quality=60)
    cases["over the frames limit"] = (long_clip.read_bytes(), 413, "video_too_large")
    for what, (body, status, code) in cases.items():
        r = video_client.post("/jobs", files={"video": ("clip.mp4", body)})
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (what, r.text)
    both = video_client.post(
        "/jobs", files=[("video", ("a.mp4", data)), ("images", ("b.jpg", small_jpeg(photos.coffee())))]
    )
    assert both.status_code == 422 and "not both" in both.json()["error"]["message"]
    neither = video_client.post("/jobs", data={"quality": "90"})
    assert neither.status_code == 422 and neither.json()["error"]["code"] == "invalid_request"
    assert video_client.get("/jobs").json()["jobs"] == []
    # An ordinary clip and an ordinary photo job still go through afterwards.
    ok = video_client.post("/jobs", files={"video": ("me.mp4", data)})
    photo = video_client.post("/jobs", files={"images": ("me.jpg", small_jpeg(photos.astronaut()))})
    assert (ok.status_code, photo.status_code) == (202, 202)
    assert _wait(video_client, ok.json()["id"])["status"] == "succeeded"
    assert _wait(video_client, photo.json()["id"])["status"] == "succeeded"


def test_a_cancelled_video_job_stops_and_keeps_no_result(video_client: TestClient, tmp_path: Path) -> None:
    longer = write_test_clip(tmp_path / "longer.mp4", _frames(100), fps=25, quality=90)
    job = video_client.post("/jobs", files={"video": ("longer.mp4", longer.read_bytes())}).json()
    deadline = time.monotonic() + 120
    while video_client.get(f"/jobs/{job['id']}").json()["done"] < 2:
        assert time.monotonic() < deadline, "no frame was written"
        time.sleep(0.05)
    cancelled = video_client.delete(f"/jobs/{job['id']}")
    assert cancelled.status_code == 200
    ended = _wait(video_client, job["id"])
    deadline = time.monotonic() + 60
    while any(item["status"] == "running" for item in ended["items"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
        ended = video_client.get(f"/jobs/{job['id']}").json()
    # Chunks run apart: those done stay ok, the others (running or queued) are cancelled.
    statuses = [item["status"] for item in ended["items"]]
    assert ended["status"] == "cancelled" and "cancelled" in statuses and "running" not in statuses, statuses
    assert ended["done"] < 100
    r = video_client.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"]["code"] == "result_not_ready"
    # The clip (one file, linked by every chunk) and the work folders go with the job's end (just
    # after each item's record says it ended): what is left (the chunks done) counts in the storage
    # as their results.
    data = Path(video_client.app.state.toonserve.jobs.store.data_dir)  # type: ignore[attr-defined]
    folder = data / "jobs" / job["id"]
    deadline = time.monotonic() + 60
    while _files_under(folder / "in") or (folder / "work").exists():
        assert time.monotonic() < deadline, _files_under(folder)
        time.sleep(0.05)


def test_a_chunk_that_fails_fails_its_job_and_keeps_nothing(
    side_by_side_client: TestClient, tmp_path: Path
) -> None:
    """A clip damaged in transit: one frame of its second chunk cannot be decoded. The probe at
    acceptance reads every packet but decodes only the first frame, so the job is accepted; the
    second chunk fails when it reaches that frame, which fails the job (no clip can be made of the
    other chunk), stops the first chunk running beside it, and lets go of everything the job held:
    its clip, its work folders, the storage reserved for its chunks' results."""
    client = side_by_side_client
    clip = write_test_clip(tmp_path / "walk.mp4", pattern_frames(100, 128, 96), fps=25, quality=90)
    # Packet 60 in decode order is frame 58 on screen: 16 frames into the second chunk's run (it
    # starts 8 frames early, at 42), long before the first chunk's 50 frames are done.
    damaged = damage_packet(clip, 60, tmp_path / "damaged.mp4")
    r = client.post("/jobs", files={"video": ("walk.mp4", damaged.read_bytes())})
    assert r.status_code == 202, r.text
    job = r.json()
    assert [(i["first_frame"], i["frames"]) for i in job["items"]] == [(0, 50), (50, 50)]

    ended = _wait(client, job["id"])
    assert ended["status"] == "failed", ended
    assert ended["error"] == (
        "frames 50–99 of the clip: corrupt_video: the video is damaged at frame 58: "
        "Invalid data found when processing input"
    ), ended["error"]
    first, second = ended["items"]
    assert second["status"] == "error"
    assert second["error"] == {"code": "job_failed", "message": ended["error"]}

    # Everything the job held goes: its clip (linked by both chunks), the work folders of both (the
    # first chunk's too, stopped mid-way), the bytes reserved for the chunks' results.
    store = service_state(client).jobs.store
    folder = Path(store.data_dir) / "jobs" / job["id"]

    def held() -> tuple[list[str], int]:
        return _files_under(folder), store.usage()

    deadline = time.monotonic() + 60
    while held() != ([], 0) or (folder / "work").exists():
        assert time.monotonic() < deadline, held()
        time.sleep(0.05)
    assert not (folder / "out" / "clip.mp4").exists()

    ended = client.get(f"/jobs/{job['id']}").json()
    first = ended["items"][0]
    # Stopped by the failure (in error with it, or cancelled where it stopped), never a result.
    assert ended["status"] == "failed" and first["status"] in ("error", "cancelled"), first
    assert first["frames_done"] < 50
    assert (ended["total"], ended["failed"]) == (100, 2 if first["status"] == "error" else 1)
    r = client.get(f"/jobs/{job['id']}/result")
    assert r.status_code == 409 and r.json()["error"] == {
        "code": "result_not_ready",
        "message": f"the job failed and has no clip: {ended['error']}",
    }


def test_metrics_count_the_frames_written(video_client: TestClient, clip: Path) -> None:
    job = video_client.post("/jobs", files={"video": ("me.mp4", clip.read_bytes())}).json()
    assert _wait(video_client, job["id"])["status"] == "succeeded"
    text = video_client.get("/metrics").text
    line = next(x for x in text.splitlines() if x.startswith("toonserve_video_frames_total "))
    assert float(line.split()[1]) == FRAMES


def test_a_photo_job_is_still_a_zip_of_images(video_client: TestClient) -> None:
    job = video_client.post("/jobs", files={"images": ("me.jpg", small_jpeg(photos.astronaut()))}).json()
    assert job["kind"] == "images" and job["items"][0]["frames"] is None
    ended = _wait(video_client, job["id"])
    assert ended["status"] == "succeeded"
    zipped = video_client.get(f"/jobs/{job['id']}/result")
    assert zipped.headers["content-type"] == "application/zip"
    with Image.open(io.BytesIO(video_client.get(ended["items"][0]["result_url"]).content)) as im:
        assert im.format == "PNG"
