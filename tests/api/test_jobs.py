"""/jobs through the app: life cycle, idempotency, bad files, cancel, events, webhooks, expiry, quota."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devkit import photos
from devkit.receiver import loopback_server
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from tests.api.conftest import jobs_settings, png_bytes, service_state, small_jpeg, sse_events, wait_ready


def _wait_job(client: TestClient, job_id: str, until: str = "ended", timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if (until == "ended" and job["status"] in ("succeeded", "failed", "cancelled")) or job[
            "status"
        ] == until:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {until}: {client.get(f'/jobs/{job_id}').json()}")


def test_life_cycle_with_a_bad_file(jobs_client: TestClient) -> None:
    files = [
        ("images", ("astronaut.jpg", small_jpeg(photos.astronaut()))),
        ("images", ("notes.txt", b"not a photo")),
        ("images", ("coffee.jpg", small_jpeg(photos.coffee()))),
    ]
    r = jobs_client.post("/jobs", files=files, data={"format": "jpeg", "strength": "0.8"})
    assert r.status_code == 202, r.text
    job = r.json()
    assert r.headers["location"] == f"/jobs/{job['id']}"
    assert job["total"] == 3 and job["options"]["format"] == "jpeg" and job["options"]["strength"] == 0.8
    assert job["items"][1]["status"] == "error" and job["items"][1]["error"]["code"] == "unsupported_image"

    job = _wait_job(jobs_client, job["id"])
    assert job["status"] == "succeeded" and (job["done"], job["failed"]) == (3, 1)
    ok = job["items"][0]
    assert ok["status"] == "ok" and ok["faces_stylized"] == 1 and ok["timings_ms"]["head"] > 0
    image = jobs_client.get(ok["result_url"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(image.content)) as im:
        assert im.size == (256, 256)
    r = jobs_client.get(f"/jobs/{job['id']}/items/1")
    assert r.status_code == 409 and r.json()["error"]["code"] == "result_not_ready"
    assert jobs_client.get(f"/jobs/{job['id']}/items/9").status_code == 404

    zipped = jobs_client.get(f"/jobs/{job['id']}/result")
    assert zipped.status_code == 200 and zipped.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as zf:
        assert zf.namelist() == ["001-astronaut.jpg", "003-coffee.jpg", "results.json"]
        assert zf.read("001-astronaut.jpg") == image.content
        report = json.loads(zf.read("results.json"))
    assert [i["status"] for i in report["items"]] == ["ok", "error", "ok"]
    assert report["job"]["status"] == "succeeded"

    listed = jobs_client.get("/jobs", params={"status": "succeeded"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]] and "items" not in listed[0]
    assert jobs_client.get("/jobs", params={"status": "queued"}).json()["jobs"] == []
    assert jobs_client.get("/jobs", params={"status": "done"}).status_code == 422

    # A finished job: DELETE removes it and its files.
    data_dir = Path(service_state(jobs_client).jobs.store.data_dir)
    assert (data_dir / "jobs" / job["id"]).is_dir()
    assert jobs_client.delete(f"/jobs/{job['id']}").status_code == 204
    assert not (data_dir / "jobs" / job["id"]).exists()
    r = jobs_client.get(f"/jobs/{job['id']}")
    assert r.status_code == 404 and r.json()["error"]["code"] == "job_not_found"
    assert jobs_client.get("/jobs/not-an-id").status_code == 422


def test_idempotency_key(jobs_client: TestClient) -> None:
    files = [("images", ("a.jpg", small_jpeg(photos.astronaut())))]
    first = jobs_client.post("/jobs", files=files, headers={"Idempotency-Key": "upload-42"})
    again = jobs_client.post("/jobs", files=files, headers={"Idempotency-Key": "upload-42"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["id"] == first.json()["id"] and again.headers["location"] == first.headers["location"]
    other = jobs_client.post("/jobs", files=files, headers={"Idempotency-Key": "upload-43"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_events_stream_then_a_late_listener(jobs_client: TestClient) -> None:
    files = [("images", (f"{i}.jpg", small_jpeg(photos.astronaut(), 128 + 32 * i))) for i in range(3)]
    job = jobs_client.post("/jobs", files=files).json()
    events = _read_events(jobs_client, job["id"])
    names = [e for e, _ in events]
    assert names[0] == "job" and names[-1] == "end" and names.count("item") + events[0][1]["done"] == 3
    assert events[-1][1]["status"] == "succeeded" and events[-1][1]["done"] == 3
    late = _read_events(jobs_client, job["id"])  # after the end: the state, then the end at once
    assert [e for e, _ in late] == ["job", "end"] and late[0][1]["done"] == 3


def _read_events(client: TestClient, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


@pytest.mark.slow
def test_cancel_stops_a_running_item_between_stages(
    jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.pipeline import Cartoonizer

    real_detect = Cartoonizer.detect
    started, cancelled = threading.Event(), threading.Event()

    def held_detect(self: Cartoonizer, job: Any) -> None:
        started.set()
        cancelled.wait(30)  # the first item is in its detection stage until the job is cancelled
        real_detect(self, job)

    monkeypatch.setattr(Cartoonizer, "detect", held_detect)
    files = [("images", (f"{i}.jpg", small_jpeg(photos.grace_hopper()))) for i in range(5)]
    job = jobs_client.post("/jobs", files=files).json()
    assert started.wait(30)
    r = jobs_client.delete(f"/jobs/{job['id']}")
    cancelled.set()
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    job = _wait_job(jobs_client, job["id"])
    deadline = time.monotonic() + 30
    while any(i["status"] == "running" for i in job["items"]) and time.monotonic() < deadline:
        time.sleep(0.05)
        job = jobs_client.get(f"/jobs/{job['id']}").json()
    statuses = [i["status"] for i in job["items"]]
    assert job["status"] == "cancelled" and statuses[0] == "cancelled", statuses  # stopped mid-way
    assert set(statuses) == {"cancelled"}
    assert jobs_client.delete(f"/jobs/{job['id']}").status_code == 204  # the second DELETE deletes


@pytest.mark.parametrize("jobs_client", [{"max_job_files": 2}], indirect=True)
def test_too_many_files(jobs_client: TestClient) -> None:
    files = [("images", (f"{i}.jpg", b"x")) for i in range(3)]
    r = jobs_client.post("/jobs", files=files)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"


@pytest.mark.parametrize(
    "jobs_client",
    [{"max_job_storage_bytes": 1_048_576, "client_job_storage_bytes": 1_048_576, "max_job_bytes": 700_000}],
    indirect=True,
)
def test_upload_limit_and_quota_refuse_before_writing(jobs_client: TestClient) -> None:
    store = service_state(jobs_client).jobs.store
    big = [("images", ("big.png", b"\x89PNG" + b"\x00" * 800_000))]
    r = jobs_client.post("/jobs", files=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # Noise does not compress: each 250×250 photo (~188 KB) reserves its result's full size
    # (250·250·3 bytes + 64 KiB): two fit in 1 MiB, three do not.
    noise = np.random.default_rng(1).integers(0, 256, (250, 250, 3), dtype=np.uint8)
    files = [("images", (f"{i}.png", png_bytes(noise))) for i in range(3)]
    r = jobs_client.post("/jobs", files=files)
    assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage"
    assert "MiB" in r.json()["error"]["message"]
    assert list((Path(store.data_dir) / "jobs").iterdir()) == []
    assert jobs_client.post("/jobs", files=files[:2]).status_code == 202


@pytest.mark.slow
@pytest.mark.parametrize("jobs_client", [{"job_ttl_s": 0.5}], indirect=True)
def test_ended_jobs_expire_with_their_files(jobs_client: TestClient) -> None:
    job = jobs_client.post("/jobs", files=[("images", ("a.jpg", small_jpeg(photos.astronaut())))]).json()
    _wait_job(jobs_client, job["id"])
    store = service_state(jobs_client).jobs.store
    deadline = time.monotonic() + 10
    while jobs_client.get(f"/jobs/{job['id']}").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert jobs_client.get(f"/jobs/{job['id']}").status_code == 404
    assert not (Path(store.data_dir) / "jobs" / job["id"]).exists()


class _Receiver(BaseHTTPRequestHandler):
    calls: ClassVar[list[tuple[dict[str, str], bytes]]] = []
    fail_first: ClassVar[int] = 1

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls.append((dict(self.headers), body))
        status = 500 if len(type(self).calls) <= type(self).fail_first else 204
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    _Receiver.calls = []
    with loopback_server(_Receiver) as url:
        yield url


@pytest.mark.slow
@pytest.mark.parametrize(
    "jobs_client", [{"webhook_secret": "whsec", "webhook_allow_private": True}], indirect=True
)
def test_webhook_is_signed_and_retried(jobs_client: TestClient, receiver: str) -> None:
    files = [("images", ("a.jpg", small_jpeg(photos.astronaut())))]
    job = jobs_client.post("/jobs", files=files, data={"webhook": receiver}).json()
    _wait_job(jobs_client, job["id"])
    deadline = time.monotonic() + 20
    while len(_Receiver.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(_Receiver.calls) == 2  # the first answer was 500: tried again
    headers, body = _Receiver.calls[-1]
    expected = "sha256=" + hmac.new(b"whsec", body, hashlib.sha256).hexdigest()
    assert headers["X-Toonserve-Signature"] == expected
    sent = json.loads(body)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["items"][0]["status"] == "ok"
    assert headers["X-Toonserve-Event"] == "job.succeeded"
    metrics = jobs_client.get("/metrics").text
    assert 'toonserve_webhook_deliveries_total{outcome="delivered"} 1.0' in metrics
    assert 'toonserve_webhook_deliveries_total{outcome="retried"} 1.0' in metrics


@pytest.mark.parametrize("jobs_client", [{"webhook_secret": "whsec"}], indirect=True)
def test_private_and_odd_webhooks_are_refused(jobs_client: TestClient) -> None:
    files = [("images", ("a.jpg", b"x"))]
    private = (
        "http://127.0.0.1:9/hook",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest",
        "http://[::1]/x",
    )
    for url in private:
        r = jobs_client.post("/jobs", files=files, data={"webhook": url})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_webhook", (url, r.text)
        assert "private, loopback or link-local" in r.json()["error"]["message"]
    # Not an http(s) URL at all: the form's own pattern refuses it.
    for url in ("ftp://example.com/x", "http://", ""):
        r = jobs_client.post("/jobs", files=files, data={"webhook": url})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (url, r.text)
    r = jobs_client.post("/jobs", files=files, data={"webhook": "http://[oops/x"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_webhook"
    assert "not a valid URL" in r.json()["error"]["message"]


def test_webhook_needs_a_secret(jobs_client: TestClient) -> None:
    r = jobs_client.post(
        "/jobs", files=[("images", ("a.jpg", b"x"))], data={"webhook": "https://example.com/h"}
    )
    assert r.status_code == 422 and "TOONSERVE_WEBHOOK_SECRET" in r.json()["error"]["message"]


@pytest.mark.parametrize("jobs_client", [{"api_key": "s3cret"}], indirect=True)
def test_jobs_need_the_api_key(jobs_client: TestClient) -> None:
    assert jobs_client.get("/jobs").status_code == 401
    assert jobs_client.post("/jobs", files=[("images", ("a.jpg", b"x"))]).status_code == 401
    assert jobs_client.get("/jobs", headers={"X-API-Key": "s3cret"}).status_code == 200


@pytest.mark.parametrize("jobs_client", [{"api_keys": "alice=a-key,bob=b-key"}], indirect=True)
def test_a_job_belongs_to_its_client(jobs_client: TestClient) -> None:
    """Another client's key gets the same 404 as for a job that does not exist, on every route."""
    alice, bob = {"X-API-Key": "a-key"}, {"X-API-Key": "b-key"}
    files = [("images", ("a.jpg", small_jpeg(photos.astronaut(), 64)))]
    created = jobs_client.post("/jobs", files=files, headers={**alice, "Idempotency-Key": "k1"})
    assert created.status_code == 202
    job_id = created.json()["id"]
    _wait_job_as(jobs_client, job_id, alice)
    for method, path in [
        ("GET", f"/jobs/{job_id}"),
        ("GET", f"/jobs/{job_id}/events"),
        ("GET", f"/jobs/{job_id}/items/0"),
        ("GET", f"/jobs/{job_id}/result"),
        ("DELETE", f"/jobs/{job_id}"),
    ]:
        theirs = jobs_client.request(method, path, headers=bob)
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "job_not_found", path
        missing = jobs_client.request(method, path.replace(job_id, "0" * 32), headers=bob)
        assert (
            theirs.json()["error"]["message"].replace(job_id, "0" * 32) == missing.json()["error"]["message"]
        )
    assert jobs_client.get("/jobs", headers=bob).json() == {"jobs": []}
    assert [j["id"] for j in jobs_client.get("/jobs", headers=alice).json()["jobs"]] == [job_id]
    assert jobs_client.get(f"/jobs/{job_id}/items/0", headers=alice).status_code == 200
    # The same Idempotency-Key from another client is that client's own: a second job.
    again = jobs_client.post("/jobs", files=files, headers={**bob, "Idempotency-Key": "k1"})
    assert again.status_code == 202 and again.json()["id"] != job_id
    same = jobs_client.post("/jobs", files=files, headers={**alice, "Idempotency-Key": "k1"})
    assert same.status_code == 200 and same.json()["id"] == job_id
    empty = jobs_client.post("/jobs", files=files, headers={**alice, "Idempotency-Key": ""})
    assert empty.status_code == 422 and "Idempotency-Key" in empty.json()["error"]["message"]
    assert jobs_client.delete(f"/jobs/{job_id}", headers=alice).status_code == 204


@pytest.mark.slow
@pytest.mark.parametrize(
    "jobs_client",
    [{"api_keys": "alice=a-key,bob=b-key", "max_job_storage_bytes": 16 * 1024 * 1024}],
    indirect=True,
)
def test_tiny_large_photos_reserve_little_and_one_client_cannot_fill_anothers_share(
    jobs_client: TestClient,
) -> None:
    """A solid-colour 9 MP lossless WebP is 100-odd bytes; its header alone would reserve its
    result's 27 MB uncompressed. Reserved from what it decodes to, it takes under 1 MB; and a client
    that fills its own share (half of the storage by default) leaves the other client's alone."""
    alice, bob = {"X-API-Key": "a-key"}, {"X-API-Key": "b-key"}
    state = service_state(jobs_client)
    store = state.jobs.store
    flat = io.BytesIO()
    Image.new("RGB", (3000, 3000), (200, 120, 90)).save(flat, "WEBP", lossless=True)
    assert len(flat.getvalue()) < 2000
    bombs = [("images", (f"{i}.webp", flat.getvalue())) for i in range(3)]
    r = jobs_client.post("/jobs", files=bombs, headers=alice)
    assert r.status_code == 202, r.text
    assert store.usage("alice") < 3 * 1024 * 1024  # 3 × 27 MB by the header
    jobs_client.delete(f"/jobs/{r.json()['id']}", headers=alice)  # no need to run them

    noise = np.random.default_rng(2).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    three = [("images", (f"{i}.png", png_bytes(noise))) for i in range(3)]
    mine = jobs_client.post("/jobs", files=three, headers=alice)
    assert mine.status_code == 202, mine.text  # ~6.7 MB of alice's 8 MiB
    more = jobs_client.post("/jobs", files=three[:1], headers=alice)
    assert more.status_code == 507 and more.json()["error"]["code"] == "insufficient_storage"
    assert "your jobs already hold" in more.json()["error"]["message"]
    theirs = jobs_client.post("/jobs", files=three[:2], headers=bob)
    assert theirs.status_code == 202, theirs.text
    for job_id, who in ((mine.json()["id"], alice), (theirs.json()["id"], bob)):
        jobs_client.delete(f"/jobs/{job_id}", headers=who)


def _wait_job_as(client: TestClient, job_id: str, headers: dict[str, str]) -> None:
    deadline = time.monotonic() + 120
    while client.get(f"/jobs/{job_id}", headers=headers).json()["status"] not in ("succeeded", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_metrics_count_jobs_and_items(jobs_client: TestClient) -> None:
    files = [("images", ("a.jpg", small_jpeg(photos.astronaut()))), ("images", ("b.txt", b"nope"))]
    job = jobs_client.post("/jobs", files=files).json()
    _wait_job(jobs_client, job["id"])
    text = jobs_client.get("/metrics").text
    assert 'toonserve_jobs{status="succeeded"} 1.0' in text
    assert 'toonserve_job_items_total{outcome="ok"} 1.0' in text
    assert "toonserve_job_items_waiting 0.0" in text
    storage = next(line for line in text.splitlines() if line.startswith("toonserve_job_storage_bytes "))
    assert float(storage.split()[1]) > 0  # the result is kept


def test_a_keys_own_storage_share(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    """``job_storage_bytes=N`` in the keys file: that client's share, whatever the service's; 0 means
    no jobs at all for it (not the default)."""
    keys = tmp_path / "keys"
    keys.write_text("viewer=v-key job_storage_bytes=0\nbig=b-key job_storage_bytes=3000000\nsmall=s-key\n")
    settings = jobs_settings(
        model_dir,
        tmp_path,
        api_keys_file=keys,
        max_job_storage_bytes=4_000_000,
        client_job_storage_bytes=1_048_576,
    )
    noise = np.random.default_rng(4).integers(0, 256, (400, 400, 3), dtype=np.uint8)
    files = [("images", ("n.png", png_bytes(noise)))]  # ~480 KB, and ~540 KB reserved for its result
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        refused = client.post("/jobs", files=files, headers={"X-API-Key": "v-key"})
        assert refused.status_code == 507 and "of your 0.0 MiB share" in refused.json()["error"]["message"]
        assert client.post("/jobs", files=files * 2, headers={"X-API-Key": "s-key"}).status_code == 507
        assert client.post("/jobs", files=files * 2, headers={"X-API-Key": "b-key"}).status_code == 202
