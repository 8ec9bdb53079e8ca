"""The service attacked from outside, as a client on loopback would: every case that once got through
(what it must do now) and the ones that always held (so they keep holding). Each runs against a live
``toonserve serve``; the units behind them have their own tests (webhooks: tests/jobs/test_webhooks.py
with a resolver that changes its answer; the stores' shares, failed writes and stray files:
tests/jobs/test_store.py; events streams: tests/api/test_job_events.py).
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import httpx
import numpy as np
import pytest
from PIL import Image

from devkit import photos
from devkit.memory import RssRise, resident_mib
from devkit.receiver import loopback_server
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env

pytestmark = pytest.mark.live

ALICE: dict[str, str] = {"X-API-Key": "alice-key"}
BOB: dict[str, str] = {"X-API-Key": "bob-key"}
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def svc(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """Two named clients, signed webhooks to public addresses only, a Host allow-list, text logs."""
    tmp = tmp_path_factory.mktemp("security")
    env = service_env(
        model_dir.path.parent,
        tmp,
        TOONSERVE_API_KEYS="alice=alice-key,bob=bob-key",
        TOONSERVE_WEBHOOK_SECRET="whsec",
        TOONSERVE_ALLOWED_HOSTS="127.0.0.1,localhost,toon.example",
        TOONSERVE_MAX_JOB_STORAGE_BYTES=str(64 * MIB),
        TOONSERVE_CLIENT_EVENT_STREAMS="4",
        TOONSERVE_LOG_FORMAT="text",
    )
    with LiveService(env, tmp / "server.log") as service:
        yield service


@pytest.fixture(scope="module")
def hooks(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveService]:
    """Open, webhooks allowed to loopback (the receivers run here), one job item at a time."""
    tmp = tmp_path_factory.mktemp("hooks")
    env = service_env(
        model_dir.path.parent,
        tmp,
        TOONSERVE_WEBHOOK_SECRET="whsec",
        TOONSERVE_WEBHOOK_ALLOW_PRIVATE="true",
        TOONSERVE_WEBHOOK_TIMEOUT_S="3",
        TOONSERVE_WEBHOOK_ATTEMPTS="1",
        TOONSERVE_JOB_CONCURRENCY="1",
        TOONSERVE_CLIENT_EVENT_STREAMS="400",
    )
    with LiveService(env, tmp / "server.log") as service:
        yield service


def _small_jpeg(side: int = 96) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photos.astronaut()).resize((side, side)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _wait_ended(
    service: LiveService, job_id: str, headers: dict[str, str], timeout: float = 120
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{service.url}/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


# -- what did not hold before ------------------------------------------------------------------------


def test_one_clients_tiny_40_mp_files_cannot_make_another_clients_job_507(svc: LiveService) -> None:
    """1.6 KB lossless WebPs of a 6324² solid colour once reserved 120 MB each: 88 of them filled the
    storage for everyone. Now each reserves what its result can take, and each client has a share."""
    flat = io.BytesIO()
    Image.new("RGB", (6324, 6324), (90, 140, 200)).save(flat, "WEBP", lossless=True)
    assert len(flat.getvalue()) < 4000
    bombs = [("images", (f"{i}.webp", flat.getvalue())) for i in range(6)]
    r = httpx.post(f"{svc.url}/jobs", files=bombs, headers=ALICE, timeout=120)
    assert r.status_code == 202, r.text  # 6 × 120 MB by their headers: more than all 64 MiB
    httpx.delete(f"{svc.url}/jobs/{r.json()['id']}", headers=ALICE)
    # Alice fills her share (half of 64 MiB) with noise, which reserves its full size...
    noise = np.random.default_rng(3).integers(0, 256, (1200, 1200, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "PNG", compress_level=1)
    heavy = [("images", (f"n{i}.png", buf.getvalue())) for i in range(3)]
    held = []
    for _ in range(4):
        r = httpx.post(f"{svc.url}/jobs", files=heavy, headers=ALICE, timeout=120)
        if r.status_code != 202:
            break
        held.append(r.json()["id"])
    assert r.status_code == 507 and "your jobs already hold" in r.json()["error"]["message"], r.text
    # ...and Bob's job still fits.
    mine = httpx.post(f"{svc.url}/jobs", files=heavy, headers=BOB, timeout=120)
    assert mine.status_code == 202, mine.text
    for job_id in held:
        httpx.delete(f"{svc.url}/jobs/{job_id}", headers=ALICE)
    httpx.delete(f"{svc.url}/jobs/{mine.json()['id']}", headers=BOB)


def _rise_while(pid: int, work: list[threading.Thread]) -> float:
    """MiB the process's RSS rose to above where it was, while ``work`` ran."""
    with RssRise(pid) as memory:
        for t in work:
            t.start()
        for t in work:
            t.join()
    return memory.rise


def test_uploads_go_to_disk_in_chunks(hooks: LiveService) -> None:
    """Three concurrent 200 MB uploads once added 600 MB to the server's memory: every photo was read
    whole to be checked. Now a photo goes from the upload to disk in chunks and only its header is
    read; one over TOONSERVE_MAX_UPLOAD_BYTES (the largest body /cartoonize takes) fails on arrival,
    unread. What is left is the runner reading the photo it works on."""
    small = _small_jpeg()
    huge = small + b"\0" * (200 * MIB)  # bytes after the image's end are not pixels
    answers: list[httpx.Response] = []

    def upload(files: list[tuple[str, tuple[str, bytes]]]) -> None:
        answers.append(httpx.post(f"{hooks.url}/jobs", files=files, timeout=300))

    pair = [("images", ("huge.jpg", huge)), ("images", ("small.jpg", small))]
    rise = _rise_while(hooks.pid, [threading.Thread(target=upload, args=(pair,)) for _ in range(3)])
    print(f"3 × 200 MB: RSS rose {rise:.0f} MiB")
    assert [r.status_code for r in answers] == [202, 202, 202]
    for r in answers:
        item = r.json()["items"][0]
        assert item["status"] == "error" and item["error"]["code"] == "image_too_large", item
        assert "TOONSERVE_MAX_UPLOAD_BYTES" in item["error"]["message"]
    assert rise < 60
    # Photos under the limit are all kept: 3 × 5 × 19 MB, each copied to disk in chunks.
    answers.clear()
    photo = small + b"\0" * (19 * MIB)
    five = [("images", (f"{i}.jpg", photo)) for i in range(5)]
    rise = _rise_while(hooks.pid, [threading.Thread(target=upload, args=(five,)) for _ in range(3)])
    print(f"3 × 5 × 19 MB: RSS rose {rise:.0f} MiB")
    assert [r.status_code for r in answers] == [202, 202, 202]
    assert rise < 100
    for job in httpx.get(f"{hooks.url}/jobs").json()["jobs"]:
        httpx.delete(f"{hooks.url}/jobs/{job['id']}")


class _Hostile(BaseHTTPRequestHandler):
    """A webhook receiver that answers 200 and then a body without end, or redirects to loopback."""

    mode: ClassVar[str] = "endless"
    sent: ClassVar[int] = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        if type(self).mode == "redirect":
            self.send_response(307)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(1 << 30))
        self.end_headers()
        chunk = b"x" * (1 << 20)
        try:
            for _ in range(1024):
                self.wfile.write(chunk)
                type(self).sent += len(chunk)
        except OSError:
            pass  # the service hung up, as it should

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def hostile() -> Iterator[str]:
    _Hostile.sent = 0
    with loopback_server(_Hostile) as url:
        yield url


def test_a_webhook_reply_without_end_is_not_read(hooks: LiveService, hostile: str) -> None:
    before = resident_mib(hooks.pid)
    r = httpx.post(
        f"{hooks.url}/jobs", files=[("images", ("a.jpg", _small_jpeg()))], data={"webhook": hostile}
    )
    assert r.status_code == 202, r.text
    _wait_ended(hooks, r.json()["id"], {})
    deadline = time.monotonic() + 30
    while "toonserve_webhook_deliveries_total" not in httpx.get(f"{hooks.url}/metrics").text:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(0.5)
    assert _Hostile.sent < 256 * MIB  # it stopped being read long before the gigabyte
    assert resident_mib(hooks.pid) - before < 50


def test_hosts_docs_logs_and_the_page(svc: LiveService) -> None:
    # Host allow-list; probes answer any host.
    evil = httpx.get(f"{svc.url}/styles", headers={**ALICE, "Host": "evil.example"})
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "host_not_allowed"
    assert httpx.get(f"{svc.url}/healthz", headers={"Host": "10.1.2.3:8000"}).status_code == 200
    assert httpx.get(f"{svc.url}/styles", headers={**ALICE, "Host": "toon.example:8000"}).status_code == 200
    # The docs pages carry a policy: this origin only, their own inline script by its hash.
    docs = httpx.get(f"{svc.url}/docs")
    policy = docs.headers["Content-Security-Policy"]
    assert docs.status_code == 200 and "'sha256-" in policy and "default-src 'self'" in policy
    script = next(p for p in policy.split("; ") if p.startswith("script-src"))
    assert "unsafe" not in script
    # The page is where the README says.
    for path in ("/", "/ui/"):
        page = httpx.get(f"{svc.url}{path}")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"], path
    # A path cannot forge a log line or send escape codes to a terminal.
    httpx.get(f"{svc.url}/x%0A2026-01-01%2000:00:00%20INFO%20forged%1B[31m", headers=ALICE)
    time.sleep(0.3)
    log = (svc.log.read_text() if svc.log else "").splitlines()
    assert not any(line.startswith("2026-01-01 00:00:00 INFO forged") for line in log)
    assert "\x1b" not in "\n".join(log)
    assert any("/x\\n2026-01-01 00:00:00 INFO forged\\x1b[31m" in line for line in log)


def test_an_empty_api_key_does_not_start(tmp_path: Path) -> None:
    env = dict(os.environ, TOONSERVE_API_KEY="", TOONSERVE_CACHE_DIR=str(tmp_path))
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "serve"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "api_key" in (done.stdout + done.stderr) and "empty" in (done.stdout + done.stderr)


# -- what held, and must keep holding ------------------------------------------------------------------


def test_every_route_but_the_open_ones_needs_a_key(svc: LiveService) -> None:
    for method, path in [
        ("POST", "/cartoonize"),
        ("POST", "/cartoonize/batch"),
        ("GET", "/styles"),
        ("POST", "/jobs"),
        ("GET", "/jobs"),
        ("GET", f"/jobs/{'0' * 32}"),
        ("GET", f"/jobs/{'0' * 32}/events"),
        ("DELETE", f"/jobs/{'0' * 32}"),
        ("POST", "/admin/reload"),
    ]:
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer"}, {"X-API-Key": ""}):
            r = httpx.request(method, svc.url + path, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, headers)
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/"):
        assert httpx.get(svc.url + path).status_code == 200, path


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/h",
        "http://localhost/h",
        "http://[::1]/h",
        "http://[::127.0.0.1]/h",
        "http://[::ffff:127.0.0.1]/h",
        "http://[64:ff9b::7f00:1]/h",
        "http://[2002:7f00:1::]/h",
        "http://2130706433/h",
        "http://0x7f.1/h",
        "http://127.1/h",
        "http://0.0.0.0/h",
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]/h",
        "http://10.0.0.1/h",
        "ftp://example.com/h",
        "http:///h",
    ],
)
def test_webhooks_to_private_places_are_refused(svc: LiveService, url: str) -> None:
    r = httpx.post(
        f"{svc.url}/jobs", files=[("images", ("a.jpg", b"x"))], data={"webhook": url}, headers=ALICE
    )
    assert r.status_code == 422 and r.json()["error"]["code"] in ("invalid_webhook", "invalid_request"), (
        r.text
    )


def test_redirects_are_not_followed(hooks: LiveService, hostile: str) -> None:
    _Hostile.mode = "redirect"
    try:
        r = httpx.post(
            f"{hooks.url}/jobs", files=[("images", ("a.jpg", _small_jpeg()))], data={"webhook": hostile}
        )
        job = _wait_ended(hooks, r.json()["id"], {})
        deadline = time.monotonic() + 20
        while httpx.get(f"{hooks.url}/jobs/{job['id']}").status_code == 200 and time.monotonic() < deadline:
            metrics = httpx.get(f"{hooks.url}/metrics").text
            if 'toonserve_webhook_deliveries_total{outcome="failed"}' in metrics:
                break
            time.sleep(0.2)
        assert (
            'toonserve_webhook_deliveries_total{outcome="failed"}' in httpx.get(f"{hooks.url}/metrics").text
        )
    finally:
        _Hostile.mode = "endless"


def test_file_names_cannot_leave_the_data_directory(svc: LiveService, tmp_path: Path) -> None:
    names = ["../../../../tmp/escaped.jpg", "/etc/passwd.jpg", "a/../../b.jpg", "..\\..\\c.jpg", "ok.jpg"]
    files = [("images", (name, _small_jpeg())) for name in names]
    r = httpx.post(f"{svc.url}/jobs", files=files, headers=ALICE, timeout=60)
    assert r.status_code in (202, 422), r.text
    if r.status_code == 202:
        job = _wait_ended(svc, r.json()["id"], ALICE)
        archive = httpx.get(f"{svc.url}/jobs/{job['id']}/result", headers=ALICE)
        with zipfile.ZipFile(io.BytesIO(archive.content)) as zf:
            for entry in zf.namelist():
                assert not entry.startswith("/") and ".." not in entry.split("/") and "\\" not in entry
        httpx.delete(f"{svc.url}/jobs/{job['id']}", headers=ALICE)
    assert not Path("/tmp/escaped.jpg").exists()


def test_streams_are_capped_and_leave_nothing_behind(svc: LiveService, hooks: LiveService) -> None:
    r = httpx.post(f"{svc.url}/jobs", files=[("images", ("a.jpg", _small_jpeg()))], headers=ALICE)
    job_id = r.json()["id"]
    _wait_ended(svc, job_id, ALICE)
    # An ended job's stream ends at once; a running one's stays: cap them on a long job.
    slow = httpx.post(
        f"{svc.url}/jobs",
        files=[("images", (f"{i}.jpg", _small_jpeg(256))) for i in range(40)],
        headers=ALICE,
    )
    slow_id = slow.json()["id"]
    with httpx.Client(timeout=30, headers=ALICE) as client:
        streams = [client.stream("GET", f"{svc.url}/jobs/{slow_id}/events") for _ in range(4)]
        opened = [s.__enter__() for s in streams]
        assert all(o.status_code == 200 for o in opened)
        over = client.get(f"{svc.url}/jobs/{slow_id}/events")
        assert over.status_code == 429 and over.json()["error"]["code"] == "too_many_requests"
        assert "Retry-After" in over.headers
        for stream in streams:
            stream.__exit__(None, None, None)
    httpx.delete(f"{svc.url}/jobs/{slow_id}", headers=ALICE)
    # Hundreds of listeners, then gone: no descriptor is left behind.
    r = httpx.post(f"{hooks.url}/jobs", files=[("images", (f"{i}.jpg", _small_jpeg(256))) for i in range(20)])
    long_id = r.json()["id"]
    fds = len(os.listdir(f"/proc/{hooks.pid}/fd"))
    socks: list[socket.socket] = []
    port = int(hooks.url.rsplit(":", 1)[1])
    for _ in range(300):
        listener = socket.create_connection(("127.0.0.1", port))
        listener.sendall(f"GET /jobs/{long_id}/events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        socks.append(listener)
    time.sleep(1.0)
    for listener in socks:
        listener.close()
    httpx.delete(f"{hooks.url}/jobs/{long_id}")
    deadline = time.monotonic() + 30
    while len(os.listdir(f"/proc/{hooks.pid}/fd")) > fds + 5 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(os.listdir(f"/proc/{hooks.pid}/fd")) <= fds + 5


def test_an_empty_idempotency_key_is_refused(svc: LiveService) -> None:
    r = httpx.post(
        f"{svc.url}/jobs",
        files=[("images", ("a.jpg", _small_jpeg()))],
        headers={**ALICE, "Idempotency-Key": ""},
    )
    assert r.status_code == 422 and "Idempotency-Key" in r.json()["error"]["message"]


def test_json_error_for_every_odd_request(svc: LiveService) -> None:
    """Odd methods, paths and bodies: a JSON error, never a 500 or a traceback."""
    cases = [
        ("GET", "/jobs/not-an-id", None),
        ("PUT", "/jobs", None),
        ("POST", "/jobs", b"not multipart"),
        ("GET", "/%ff%fe", None),
        ("GET", "/jobs?limit=99999", None),
    ]
    for method, path, body in cases:
        r = httpx.request(method, svc.url + path, content=body, headers=ALICE)
        assert 400 <= r.status_code < 500, (method, path, r.status_code)
        assert "error" in json.loads(r.content), (method, path)
