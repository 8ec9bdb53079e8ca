"""A real uvicorn process: the README's curl examples verbatim, probes under load, graceful shutdown."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.clips import write_test_clip
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env
from serving.video import probe_video

pytestmark = pytest.mark.live

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_curl_examples(heading: str = "## Examples") -> list[str]:
    """The ``curl`` lines of a README section (by default the Examples)."""
    text = README.read_text()
    section = text.split(heading + "\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    return [
        line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith("curl ")
    ]


@pytest.fixture(scope="module")
def server(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    tmp = tmp_path_factory.mktemp("live")
    with LiveService(service_env(model_dir.path.parent, tmp), tmp / "server.log") as srv:
        yield srv


def test_readme_curl_examples_run_verbatim(server: LiveService, tmp_path: Path) -> None:
    Image.fromarray(photos.astronaut()).save(tmp_path / "me.jpg", quality=92)
    Image.fromarray(photos.grace_hopper()).save(tmp_path / "friends.jpg", quality=92)
    frame = np.asarray(Image.fromarray(photos.astronaut()).resize((96, 96)))
    write_test_clip(tmp_path / "clip.mp4", [frame] * 5, fps=10, quality=90)
    examples = readme_curl_examples()
    assert len(examples) >= 5
    for line in examples:
        args = shlex.split(line.replace("localhost:8000", f"127.0.0.1:{server.port}"))
        done = subprocess.run(
            [*args, "-sS", "-w", "%{http_code}"], cwd=tmp_path, capture_output=True, timeout=120
        )
        assert done.returncode == 0, (line, done.stderr)
        status = done.stdout[-3:].decode()
        assert status in ("200", "202"), (line, done.stdout[-500:])
    with Image.open(tmp_path / "toon.png") as im:
        assert im.format == "PNG" and im.size == (512, 512)
    with Image.open(tmp_path / "toon.jpg") as im:
        assert im.format == "JPEG" and max(im.size) == 1024
    report = json.loads((tmp_path / "toon.json").read_text())
    assert report["faces_stylized"] == 1 and report["format"] == "png"
    with zipfile.ZipFile(tmp_path / "toons.zip") as zf:
        assert zf.namelist() == ["001-me.png", "002-friends.png", "results.json"]

    # The Video section's three lines: submit a clip, follow it, download the cartoon clip.
    first, *rest = readme_curl_examples("### Video jobs over HTTP")
    port = f"127.0.0.1:{server.port}"
    done = subprocess.run(
        shlex.split(first.replace("localhost:8000", port)), cwd=tmp_path, capture_output=True
    )
    job_id = json.loads(done.stdout)["id"]
    for line in rest:
        command = line.replace("localhost:8000", port).replace("$ID", job_id)
        done = subprocess.run([*shlex.split(command), "-sS"], cwd=tmp_path, capture_output=True, timeout=120)
        assert done.returncode == 0, (line, done.stderr)
    assert probe_video(tmp_path / "toon.mp4").frames == 5


def test_logs_are_json_with_request_ids(server: LiveService) -> None:
    req = urllib.request.Request(server.url + "/healthz", headers={"X-Request-ID": "trace-42"})
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.headers["X-Request-ID"] == "trace-42"
    time.sleep(0.2)
    lines = [json.loads(x) for x in _log(server).splitlines() if x.startswith("{")]
    access = [x for x in lines if x.get("request_id") == "trace-42"]
    assert access and access[-1]["path"] == "/healthz" and access[-1]["status"] == 200


def _metric(server: LiveService, name: str) -> float:
    text = server.get("/metrics")[1].decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _slow_post(server: LiveService, tmp_path: Path, variant: int = 0) -> list[str]:
    """A curl command posting the four-face composite (the slowest photo) and printing the status;
    each ``variant`` is another file (saved at another quality), so that the service does not answer
    one from another's work (the result cache)."""
    body = tmp_path / f"big-{variant}.jpg"
    Image.fromarray(photos.group(4)).save(body, quality=90 - variant)
    return [
        "curl",
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-F",
        f"image=@{body}",
        server.url + "/cartoonize",
    ]


def test_client_that_disconnects_has_its_queued_work_dropped(server: LiveService, tmp_path: Path) -> None:
    cancelled = 'toonserve_images_total{client="anonymous",outcome="cancelled"}'
    before = _metric(server, cancelled)
    busy = [subprocess.Popen(_slow_post(server, tmp_path, i), stdout=subprocess.PIPE) for i in range(2)]
    time.sleep(0.3)  # both are accepted; the worker is on the first
    cmd = _slow_post(server, tmp_path, 2)
    impatient = subprocess.run([*cmd[:-1], "--max-time", "0.5", cmd[-1]], capture_output=True)
    assert impatient.returncode == 28  # curl: operation timed out, connection closed
    assert [p.communicate(timeout=120)[0] for p in busy] == [b"200", b"200"]
    deadline = time.monotonic() + 30
    while _metric(server, cancelled) < before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, cancelled) == before + 1


def test_healthz_answers_while_busy_and_sigterm_finishes_work(server: LiveService, tmp_path: Path) -> None:
    results: list[int] = []

    def post(variant: int) -> None:
        done = subprocess.run(_slow_post(server, tmp_path, variant), capture_output=True, timeout=120)
        results.append(int(done.stdout or b"0"))

    workers = [threading.Thread(target=post, args=(3 + i,)) for i in range(3)]
    for w in workers:
        w.start()
    time.sleep(0.5)  # the worker is now busy with the first images
    status, payload = server.get("/healthz", timeout=5)
    assert status == 200 and json.loads(payload) == {"status": "ok"}
    assert server.proc is not None
    server.proc.send_signal(signal.SIGTERM)  # graceful: accepted requests still complete
    for w in workers:
        w.join(120)
    assert results == [200, 200, 200]
    # Uvicorn re-raises the signal once it has shut down cleanly, so the exit is "killed by SIGTERM";
    # the lifespan's last log line proves the shutdown ran to its end.
    assert server.proc is not None and server.proc.wait(60) in (0, -signal.SIGTERM)
    messages = [json.loads(x)["message"] for x in _log(server).splitlines() if x.startswith("{")]
    assert "stopped" in messages


def _log(server: LiveService) -> str:
    assert server.log is not None
    return server.log.read_text()
