"""Seen before, answered at once, over HTTP: ``X-Cache``, ``Server-Timing``, per-client entries, the
same photo twice in a batch or a job, ETags and 304, metrics."""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from tests.api.conftest import jobs_settings, make_settings, small_jpeg, unseen_portrait, wait_ready

# Each test runs the models several times through a service of its own or the module's: about 17 s in
# all; the flow-level tests (tests/serving/test_result_cache.py) keep the fast loop covered.
pytestmark = pytest.mark.slow


ALICE = {"X-API-Key": "alice-key"}
BOB = {"X-API-Key": "bob-key"}


@pytest.fixture(scope="module")
def keyed(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service with two named clients, alice and bob, and jobs."""
    tmp = tmp_path_factory.mktemp("keyed")
    settings = jobs_settings(model_dir, tmp, api_keys="alice=alice-key,bob=bob-key", dtype="float32")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        yield client


def _post(client: TestClient, data: bytes, headers: dict[str, str], **fields: Any) -> Any:
    return client.post(
        "/cartoonize",
        files={"image": ("me.jpg", data)},
        data={k: str(v) for k, v in fields.items()},
        headers=headers,
    )


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def test_a_changed_strength_format_or_size_is_a_hit_with_the_bytes_of_a_full_run(
    keyed: TestClient, model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    photo = unseen_portrait()
    hits, misses = (
        _metric(keyed, "toonserve_result_cache_hits_total"),
        _metric(keyed, "toonserve_result_cache_misses_total"),
    )
    first = _post(keyed, photo, ALICE)
    assert first.status_code == 200 and first.headers["x-cache"] == "miss"
    assert 'cache;desc="miss"' in first.headers["server-timing"]
    changes: list[dict[str, Any]] = [
        {"strength": 0.4},
        {"format": "jpeg", "quality": 70},
        {"output_size": 200, "format": "webp"},
        {"no_face": "passthrough"},
    ]
    answers = []
    for fields in changes:
        r = _post(keyed, photo, ALICE, **fields)
        assert r.status_code == 200 and r.headers["x-cache"] == "hit", fields
        timings = dict(part.split(";dur=") for part in r.headers["server-timing"].split(", ")[:-1])
        assert float(timings["background"]) == float(timings["head"]) == float(timings["decode"]) == 0
        assert r.headers["server-timing"].endswith('cache;desc="hit"')
        answers.append(r.content)
    assert Image.open(io.BytesIO(answers[2])).size[0] == 200
    report = _post(keyed, photo, ALICE, strength=0.4, response="json").json()
    assert report["cache"] == "hit" and report["faces_stylized"] == 1
    assert _metric(keyed, "toonserve_result_cache_hits_total") == hits + 5
    assert _metric(keyed, "toonserve_result_cache_misses_total") == misses + 1
    assert _metric(keyed, "toonserve_result_cache_entries") >= 1
    assert _metric(keyed, "toonserve_result_cache_bytes") > 0

    # The same requests to a service without a cache: the models run, and give the same bytes.
    settings = make_settings(model_dir, tmp_path / "cache", result_cache_bytes=0, dtype="float32")
    with TestClient(create_app(settings)) as plain:
        wait_ready(plain)
        for fields, cached in zip(changes, answers, strict=True):
            r = _post(plain, photo, {}, **fields)
            assert r.headers["x-cache"] == "miss" and r.content == cached, fields


def test_one_clients_photo_never_answers_another_client(keyed: TestClient) -> None:
    photo = unseen_portrait()
    assert _post(keyed, photo, ALICE).headers["x-cache"] == "miss"
    assert _post(keyed, photo, BOB, strength=0.5).headers["x-cache"] == "miss"
    assert _post(keyed, photo, BOB, strength=0.7).headers["x-cache"] == "hit"
    assert _post(keyed, photo, ALICE, strength=0.7).headers["x-cache"] == "hit"


def test_another_style_size_or_photo_is_a_miss(keyed: TestClient) -> None:
    photo = unseen_portrait()
    assert _post(keyed, photo, ALICE).headers["x-cache"] == "miss"
    assert _post(keyed, photo, ALICE, processing_size=256).headers["x-cache"] == "miss"
    assert _post(keyed, unseen_portrait(), ALICE).headers["x-cache"] == "miss"


def test_the_same_photo_twice_in_a_batch_runs_once(keyed: TestClient) -> None:
    photo, other = unseen_portrait(), unseen_portrait()
    files = [("images", ("a.jpg", photo)), ("images", ("b.jpg", other)), ("images", ("a2.jpg", photo))]
    r = keyed.post("/cartoonize/batch", files=files, data={"response": "json"}, headers=ALICE)
    assert r.status_code == 200
    results = [item["result"] for item in r.json()["results"]]
    assert [res["cache"] for res in results] == ["miss", "miss", "hit"]
    assert results[0]["image"] == results[2]["image"]


def test_the_same_photo_twice_in_a_job_runs_once(keyed: TestClient) -> None:
    photo = unseen_portrait()
    files = [("images", (f"{i}.jpg", photo)) for i in range(3)]
    job = keyed.post("/jobs", files=files, headers=ALICE).json()
    deadline = time.monotonic() + 120
    while (job := keyed.get(f"/jobs/{job['id']}", headers=ALICE).json())["status"] != "succeeded":
        assert time.monotonic() < deadline and job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    backgrounds = sorted(item["timings_ms"]["background"] > 0 for item in job["items"])
    assert backgrounds == [False, False, True]  # the models ran for one of the three
    images = [keyed.get(f"/jobs/{job['id']}/items/{i}", headers=ALICE).content for i in range(3)]
    assert images[0] == images[1] == images[2]


def test_etags_answer_304_without_running_anything(keyed: TestClient) -> None:
    photo = unseen_portrait()
    first = _post(keyed, photo, ALICE, strength=0.8)
    etag = first.headers["etag"]
    assert etag.startswith('"') and etag.endswith('"') and not etag.startswith('"W/')
    assert first.headers["cache-control"] == "private, no-cache"
    misses = _metric(keyed, "toonserve_result_cache_misses_total")
    hits = _metric(keyed, "toonserve_result_cache_hits_total")
    for header in (etag, f"W/{etag}", f'"nope", {etag}'):
        r = _post(keyed, photo, {**ALICE, "If-None-Match": header}, strength=0.8)
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag, header
        assert r.headers["cache-control"] == "private, no-cache"
    # Nothing ran for them: the cache was not even asked.
    assert _metric(keyed, "toonserve_result_cache_misses_total") == misses
    assert _metric(keyed, "toonserve_result_cache_hits_total") == hits
    # Another option, another photo or "*": a new answer with its own tag.
    other = _post(keyed, photo, {**ALICE, "If-None-Match": etag}, strength=0.7)
    assert other.status_code == 200 and other.headers["etag"] != etag
    assert _post(keyed, unseen_portrait(), {**ALICE, "If-None-Match": etag}).status_code == 200
    assert _post(keyed, photo, {**ALICE, "If-None-Match": "*"}, strength=0.8).status_code == 200
    # The same request gets the same tag (and bytes), whoever asks; the JSON report has none.
    again = _post(keyed, photo, BOB, strength=0.8)
    assert again.headers["etag"] == etag and again.content == first.content
    assert "etag" not in _post(keyed, photo, ALICE, strength=0.8, response="json").headers


def test_the_salt_changes_every_tag(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    photo = small_jpeg(photos.grace_hopper())
    tags = []
    for salt in ("", "after-the-update"):
        settings = make_settings(model_dir, tmp_path / "cache", etag_salt=salt)
        with TestClient(create_app(settings)) as client:
            wait_ready(client)
            tags.append(_post(client, photo, {}).headers["etag"])
    assert tags[0] != tags[1]


def test_job_downloads_carry_etags(keyed: TestClient) -> None:
    files = [("images", ("a.jpg", unseen_portrait())), ("images", ("b.jpg", b"not a photo"))]
    job = keyed.post("/jobs", files=files, headers=ALICE).json()
    deadline = time.monotonic() + 120
    while (job := keyed.get(f"/jobs/{job['id']}", headers=ALICE).json())["status"] not in (
        "succeeded",
        "failed",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    item = keyed.get(f"/jobs/{job['id']}/items/0", headers=ALICE)
    etag = item.headers["etag"]
    assert item.headers["cache-control"] == "private, no-cache"
    r = keyed.get(f"/jobs/{job['id']}/items/0", headers={**ALICE, "If-None-Match": etag})
    assert r.status_code == 304 and r.content == b""
    zipped = keyed.get(f"/jobs/{job['id']}/result", headers=ALICE)
    zip_tag = zipped.headers["etag"]
    time.sleep(1.1)  # ZIP entries carry a time stamp: the job's, not the download's
    again = keyed.get(f"/jobs/{job['id']}/result", headers=ALICE)
    assert again.headers["etag"] == zip_tag and again.content == zipped.content
    assert zipfile.ZipFile(io.BytesIO(again.content)).namelist()[-1] == "results.json"
    r = keyed.get(f"/jobs/{job['id']}/result", headers={**ALICE, "If-None-Match": zip_tag})
    assert r.status_code == 304 and r.content == b""
    # Another client sees no job, tag or not.
    r = keyed.get(f"/jobs/{job['id']}/result", headers={**BOB, "If-None-Match": zip_tag})
    assert r.status_code == 404


def test_a_cache_of_zero_turns_it_off(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    settings = make_settings(model_dir, tmp_path / "cache", result_cache_bytes=0)
    photo = small_jpeg(photos.grace_hopper())
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        assert [_post(client, photo, {}).headers["x-cache"] for _ in range(2)] == ["miss", "miss"]
        assert _metric(client, "toonserve_result_cache_capacity_bytes") == 0
        assert _metric(client, "toonserve_result_cache_entries") == 0


def test_a_photo_without_a_face_is_finished_from_what_its_policy_needs(keyed: TestClient) -> None:
    coffee = small_jpeg(photos.coffee(), side=200)
    assert _post(keyed, coffee, BOB, no_face="passthrough").headers["x-cache"] == "miss"
    # The background pass did not run for passthrough: the whole-photo cartoon needs it.
    assert _post(keyed, coffee, BOB, no_face="background").headers["x-cache"] == "miss"
    assert _post(keyed, coffee, BOB, no_face="background", strength=0.3).headers["x-cache"] == "hit"
    r = _post(keyed, coffee, BOB, no_face="error")
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_face"
