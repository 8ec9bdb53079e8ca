"""A video job against a real server process: killed with -9 half-way, it resumes from the segments
it had written (not from the first frame) and ends with the whole clip; the jobs CLI sends a clip and
saves the cartoon clip."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.clips import write_test_clip
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env
from jobs.files import SEGMENTS
from serving.video import probe_video

pytestmark = pytest.mark.live

FRAMES = 60


def _frames(n: int, side: int = 128) -> list[np.ndarray]:
    big = np.asarray(Image.fromarray(photos.grace_hopper()).resize((side + n + 20, side + 20)))
    return [np.ascontiguousarray(big[10 : 10 + side, 10 + i : 10 + i + side]) for i in range(n)]


@pytest.fixture
def service(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[LiveService]:
    env = service_env(model_dir.path.parent, tmp_path, TOONSERVE_PROCESSING_SIZE="128")
    with LiveService(env, tmp_path / "server.log") as svc:
        yield svc


def test_kill_9_mid_clip_resumes_from_the_last_segment(service: LiveService, tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "walk.mp4", _frames(FRAMES), fps=10, audio=True, quality=90)
    r = httpx.post(service.url + "/jobs", files={"video": ("walk.mp4", clip.read_bytes())}, timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    chunk = Path(service.env["TOONSERVE_DATA_DIR"]) / "jobs" / job_id / "work" / "0000"
    # Segments are about 2 s of the clip (20 frames here), in the claim's own folder: kill once one
    # is complete.
    deadline = time.monotonic() + 180
    while not list(chunk.glob(f"*/{SEGMENTS}/seg-*.mp4")):
        assert time.monotonic() < deadline, service.job(job_id)
        time.sleep(0.05)
    service.kill()
    kept = sorted(p.name for p in chunk.glob(f"*/{SEGMENTS}/seg-*.mp4"))
    assert kept and kept[0].startswith("seg-0000000-"), kept
    resume_at = int(kept[-1].split("-")[2].split(".")[0])
    assert 0 < resume_at < FRAMES

    service.start()
    deadline = time.monotonic() + 300
    job = service.job(job_id)
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.1)
        job = service.job(job_id)
    assert job["status"] == "succeeded" and job["done"] == job["total"] == FRAMES, job
    # The second run did only the frames after the segments the first one had finished.
    timings = job["items"][0]["timings_ms"]
    assert timings["frames_per_s"] > 0
    status, body = service.get(f"/jobs/{job_id}/result", timeout=60)
    assert status == 200
    out = tmp_path / "toon.mp4"
    out.write_bytes(body)
    info = probe_video(out)
    assert (info.frames, info.has_audio, info.width) == (FRAMES, True, 128)
    log = (tmp_path / "server.log").read_text()
    assert "queued again" in log
    # The resumed run says where it started (the log line of the clip's end).
    resumed = [json.loads(x) for x in log.splitlines() if x.startswith("{") and "resumed from frame" in x]
    assert resumed and f"resumed from frame {resume_at}" in resumed[-1]["message"], resumed


def test_the_jobs_cli_sends_a_clip_and_saves_the_cartoon_clip(service: LiveService, tmp_path: Path) -> None:
    clip = write_test_clip(tmp_path / "hello.mov", _frames(8), fps=8, quality=90)
    out = tmp_path / "toon.mp4"
    cmd = [sys.executable, "-m", "service.cli", "jobs", "submit", str(clip), "--server", service.url]
    done = subprocess.run([*cmd, "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "8 frames cartoonized" in done.stdout and "8 frames of a clip" in done.stderr
    assert probe_video(out).frames == 8
    # A file that is not a clip: the server's 415, said plainly.
    note = tmp_path / "notes.txt"
    note.write_text("not a clip")
    cmd = [sys.executable, "-m", "service.cli", "jobs", "submit", str(note), "--server", service.url]
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "415 unsupported_video" in bad.stderr, bad.stderr
