"""Jobs across process boundaries: kill -9 half-way and restart, and the ``toonserve jobs`` CLI."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env

pytestmark = pytest.mark.live


@pytest.fixture
def service(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[LiveService]:
    with LiveService(service_env(model_dir.path.parent, tmp_path), tmp_path / "server.log") as svc:
        yield svc


def _photo_set(count: int) -> list[tuple[str, bytes]]:
    """``count`` different small photos (three sources, several sizes and crops), JPEG."""
    sources = [photos.astronaut(), photos.grace_hopper(), photos.coffee()]
    out = []
    for i in range(count):
        rgb = sources[i % 3]
        side = 160 + 16 * (i // 3)
        buf = io.BytesIO()
        Image.fromarray(rgb).resize((side, side + 8 * (i % 2))).save(buf, "JPEG", quality=90)
        out.append((f"photo-{i:02d}.jpg", buf.getvalue()))
    return out


def _post(url: str, files: list[tuple[str, bytes]], field: str, data: dict[str, str]) -> tuple[int, bytes]:
    import httpx

    r = httpx.post(url, files=[(field, f) for f in files], data=data, timeout=120)
    return r.status_code, r.content


def test_kill_9_half_way_then_restart_finishes_every_photo_once(service: LiveService) -> None:
    files = _photo_set(20)
    status, body = _post(service.url + "/jobs", files, "images", {})
    assert status == 202, body
    job_id = json.loads(body)["id"]
    deadline = time.monotonic() + 120
    while service.job(job_id)["done"] < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.kill()
    data_dir = Path(service.env["TOONSERVE_DATA_DIR"])
    assert (data_dir / "jobs" / job_id).is_dir()

    # What the dead process had recorded: half-way, with items running.
    with sqlite3.connect(data_dir / "jobs.db") as db:
        states = dict(db.execute("SELECT status, COUNT(*) FROM items GROUP BY status").fetchall())
    assert 6 <= states.get("ok", 0) < 20 and states.get("running", 0) >= 1, states

    service.start()
    deadline = time.monotonic() + 300
    job = service.job(job_id)
    while job["status"] not in ("succeeded", "failed", "cancelled") and time.monotonic() < deadline:
        time.sleep(0.1)
        job = service.job(job_id)
    assert job["status"] == "succeeded" and job["done"] == 20 and job["failed"] == 0, job
    assert "queued again" in _log(service)

    status, zipped = service.get(f"/jobs/{job_id}/result")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(zipped)) as zf:
        names = [n for n in zf.namelist() if n != "results.json"]
        assert len(names) == len(set(names)) == 20
        results = {n.split("-", 1)[1].rsplit(".", 1)[0]: zf.read(n) for n in names}
    for name, data in files:
        status, expected = _post(service.url + "/cartoonize", [(name, data)], "image", {})
        assert status == 200
        ours = np.asarray(Image.open(io.BytesIO(results[name.rsplit(".", 1)[0]])))
        theirs = np.asarray(Image.open(io.BytesIO(expected)))
        np.testing.assert_array_equal(ours, theirs, err_msg=name)


def test_the_jobs_cli_submits_follows_and_downloads(service: LiveService, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name, data in _photo_set(4):
        (folder / name).write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 nope")
    out = tmp_path / "toons.zip"
    cmd = [sys.executable, "-m", "service.cli", "jobs", "submit", str(folder), "--server", service.url]
    done = subprocess.run(
        [*cmd, "--output", str(out), "--format", "jpeg"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 1, done.stderr  # one photo failed, the others are in the ZIP
    assert "succeeded: 4 of 5 photos cartoonized" in done.stdout
    assert "broken.jpg:" in done.stderr and "photo-00.jpg: ok" in done.stderr  # one line a photo (no tty)
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == [
            "002-photo-00.jpg",
            "003-photo-01.jpg",
            "004-photo-02.jpg",
            "005-photo-03.jpg",
            "results.json",
        ]
    job_id = done.stderr.split("job ", 1)[1].split(":", 1)[0]
    status = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs", "status", job_id, "--server", service.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and f"{job_id} succeeded: 5 of 5 done, 1 failed" in status.stdout
    missing = subprocess.run(
        [sys.executable, "-m", "service.cli", "jobs", "status", "0" * 32, "--server", service.url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "404 job_not_found" in missing.stderr


def _log(server: LiveService) -> str:
    assert server.log is not None
    return server.log.read_text()
