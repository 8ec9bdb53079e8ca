"""POST /cartoonize and /cartoonize/batch through the app, with the synthetic model."""

from __future__ import annotations

import base64
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import server_timing
from inference.pipeline import Options
from service.app import create_app
from serving.scheduler import Scheduler
from tests.api.conftest import make_settings, png_bytes, service_state, wait_ready


def test_image_response(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg, "image/jpeg")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-faces-stylized"] == "1"
    assert len(r.headers["x-request-id"]) == 32
    timing = server_timing(r.headers["server-timing"])
    stages = ["resize", "background", "detect", "align", "head", "blend", "strength", "resize_out"]
    assert list(timing) == ["decode", "queue", *stages, "encode"]
    assert timing["background"] > 0 and timing["head"] > 0
    with Image.open(io.BytesIO(r.content)) as im:
        assert im.format == "PNG" and im.size == (512, 512) and im.mode == "RGB"


def test_json_response_and_fields(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post(
        "/cartoonize",
        files={"image": ("me.jpg", portrait_jpeg, "image/jpeg")},
        data={"response": "json", "format": "webp", "quality": "80", "output_size": "256", "strength": "0.7"},
        headers={"X-Request-ID": "abc-123"},
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "abc-123"
    body = r.json()
    assert body["format"] == "webp" and body["media_type"] == "image/webp"
    assert body["output_size"] == {"width": 256, "height": 256}
    assert body["input_size"] == {"width": 512, "height": 512}
    assert body["faces_stylized"] == 1 and body["faces"][0]["stylized"] is True
    assert len(body["faces"][0]["landmarks"]) == 5
    assert body["style"] == "anime" and body["device"] == "cpu" and body["dtype"] == "float32"
    assert set(body["timings_ms"]) >= {"decode", "queue", "background", "head", "encode"}
    with Image.open(io.BytesIO(base64.b64decode(body["image"]))) as im:
        assert im.format == "WEBP" and im.size == (256, 256)


def test_no_face_policies(client: TestClient, coffee_jpeg: bytes) -> None:
    files = {"image": ("coffee.jpg", coffee_jpeg, "image/jpeg")}
    r = client.post("/cartoonize", files=files, data={"no_face": "error"})
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "no_face"
    r = client.post("/cartoonize", files=files, data={"response": "json"})
    assert r.status_code == 200 and r.json()["no_face"] == "background" and r.json()["faces"] == []
    r = client.post("/cartoonize", files=files, data={"response": "json", "no_face": "passthrough"})
    assert r.json()["no_face"] == "passthrough" and r.json()["output_size"] == {"width": 600, "height": 400}


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ({"strength": "1.5"}, "strength"),
        ({"processing_size": "10"}, "processing_size"),
        ({"format": "gif"}, "format"),
        ({"quality": "0"}, "quality"),
        ({"no_face": "maybe"}, "no_face"),
        ({"response": "xml"}, "response"),
        ({"output_size": "abc"}, "output_size"),
    ],
)
def test_bad_fields_are_422(
    client: TestClient, portrait_jpeg: bytes, data: dict[str, str], fragment: str
) -> None:
    r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg, "image/jpeg")}, data=data)
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_request" and fragment in err["message"]


def test_missing_image_and_unknown_style(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post("/cartoonize", data={"style": "anime"})
    assert r.status_code == 422 and "image" in r.json()["error"]["message"]
    r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)}, data={"style": "pixar"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "unknown_style"
    r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)}, data={"style": "3d"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "style_not_loaded"


def test_bad_images(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post("/cartoonize", files={"image": ("me.jpg", b"hello, world", "image/jpeg")})
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image"
    r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg[: len(portrait_jpeg) // 2])})
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt_image"
    big = png_bytes(np.zeros((2100, 2100, 3), np.uint8))  # 4.4 MP > the 4 MP limit, small file
    r = client.post("/cartoonize", files={"image": ("big.png", big)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "image_too_large"
    r = client.post("/cartoonize", files={"image": ("huge.bin", b"\xff" * 3_100_000)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
    # Sizes as people read them.
    assert (
        r.json()["error"]["message"] == "the upload is 3.1 MB; this service takes at most 3.0 MB per request"
    )


#: The commonest first mistakes with curl, what the service receives from each, and what its answer
#: must name: what was received, and the line that works.
MISTAKES: dict[str, tuple[dict[str, Any], str]] = {
    "-F file=@me.jpg": (
        {"files": {"file": ("me.jpg", b"\xff\xd8\xff", "image/jpeg")}},
        "no file field named image; the form had file (the file 'me.jpg'). Send the photo in a file field "
        "named image: curl -F image=@me.jpg http://testserver/cartoonize",
    ),
    "-F photo=@me.jpg -F style=anime": (
        {"files": {"photo": ("me.jpg", b"\xff\xd8\xff", "image/jpeg")}, "data": {"style": "anime"}},
        "the form had style (text 'anime'), photo (the file 'me.jpg')",
    ),
    "--data-binary @me.jpg": (
        {"content": b"\xff\xd8\xff" * 10, "headers": {"content-type": "application/x-www-form-urlencoded"}},
        "received a body of type application/x-www-form-urlencoded (30 bytes), not a multipart form; send "
        "the photo in a file field named image (multipart/form-data), e.g. curl -F image=@me.jpg "
        "http://testserver/cartoonize",
    ),
    "-H 'Content-Type: image/jpeg' --data-binary @me.jpg": (
        {"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}},
        "received a body of type image/jpeg (3 bytes), not a multipart form",
    ),
    "nothing": ({}, "received no body, not a multipart form"),
    "-F image=me.jpg (no @)": (
        {"files": {"image": (None, b"me.jpg")}},
        "image was sent as text ('me.jpg'), not as a file; with curl, put @ before the file name: "
        "curl -F image=@me.jpg http://testserver/cartoonize",
    ),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_each_common_mistake_is_told_what_was_received_and_what_to_send(
    client: TestClient, mistake: str
) -> None:
    request, expected = MISTAKES[mistake]
    r = client.post("/cartoonize", **request)
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert expected in message
    assert "curl -F image=@me.jpg" in message
    for python in ("<class", "UploadFile", "Field required", "Value error"):
        assert python not in message


def test_a_batch_names_its_own_field(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post("/cartoonize/batch", files={"image": ("me.jpg", portrait_jpeg)})
    assert r.status_code == 422
    assert r.json()["error"]["message"] == (
        "no file field named images; the form had image (the file 'me.jpg'). Send each photo in a file "
        "field named images: curl -F images=@me.jpg -F images=@friends.jpg http://testserver/cartoonize/batch"
    )


def test_output_has_no_input_metadata(client: TestClient) -> None:
    from devkit import photos

    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    exif[0x8825] = {1: "N", 2: (1.0, 2.0, 3.0)}  # GPS IFD
    buf = io.BytesIO()
    Image.fromarray(photos.astronaut()).save(buf, "JPEG", exif=exif.tobytes())
    r = client.post("/cartoonize", files={"image": ("gps.jpg", buf.getvalue())}, data={"format": "jpeg"})
    assert r.status_code == 200
    assert b"SecretCam" not in r.content
    with Image.open(io.BytesIO(r.content)) as im:
        assert len(im.getexif()) == 0


def test_batch_zip_with_one_bad_file(client: TestClient, portrait_jpeg: bytes, coffee_jpeg: bytes) -> None:
    files = [
        ("images", ("me.jpg", portrait_jpeg, "image/jpeg")),
        ("images", ("notes.txt", b"not an image", "text/plain")),
        ("images", ("coffee.jpg", coffee_jpeg, "image/jpeg")),
    ]
    r = client.post("/cartoonize/batch", files=files, data={"format": "jpeg"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = zf.namelist()
        manifest = json.loads(zf.read("results.json"))
        assert names == ["001-me.jpg", "003-coffee.jpg", "results.json"]
        with Image.open(io.BytesIO(zf.read("001-me.jpg"))) as im:
            assert im.format == "JPEG" and im.size == (512, 512)
    statuses = [(i["filename"], i["status"], i["http_status"]) for i in manifest["results"]]
    assert statuses == [("me.jpg", "ok", 200), ("notes.txt", "error", 415), ("coffee.jpg", "ok", 200)]
    assert manifest["results"][1]["error"]["code"] == "unsupported_image"
    assert manifest["results"][0]["result"]["faces_stylized"] == 1
    # The images are files of the ZIP: the report carries no (empty) copy of them.
    assert "image" not in manifest["results"][0]["result"]
    assert manifest["results"][0]["result"]["media_type"] == "image/jpeg"


def test_batch_json(client: TestClient, portrait_jpeg: bytes) -> None:
    files = [("images", ("a.jpg", portrait_jpeg)), ("images", ("b.jpg", portrait_jpeg))]
    r = client.post("/cartoonize/batch", files=files, data={"response": "json", "no_face": "error"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "ok"]
    assert [x["http_status"] for x in results] == [200, 200]
    assert all(base64.b64decode(x["result"]["image"])[:4] == b"\x89PNG" for x in results)


def test_batch_file_limit(client: TestClient, portrait_jpeg: bytes) -> None:
    files = [("images", (f"{i}.jpg", portrait_jpeg)) for i in range(17)]
    r = client.post("/cartoonize/batch", files=files)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_files"


def test_full_queue_is_503_with_retry_after(client: TestClient, unseen_jpeg: bytes) -> None:
    engine = service_state(client).engine
    real = engine.scheduler
    stalled = Scheduler(real.cartoonizers, queue_size=1, name="stalled")  # never started: nothing drains
    engine.scheduler = stalled
    try:
        stalled.submit("anime", np.zeros((8, 8, 3), np.uint8), Options(), time.monotonic() + 60)
        r = client.post("/cartoonize", files={"image": ("me.jpg", unseen_jpeg)})
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
        r = client.post("/cartoonize/batch", files=[("images", ("me.jpg", unseen_jpeg))])
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full"
        assert int(r.headers["retry-after"]) >= 1
    finally:
        engine.scheduler = real


def test_deadline_is_504_and_work_is_dropped(client: TestClient, unseen_jpeg: bytes) -> None:
    state = service_state(client)
    engine, flow = state.engine, state.flow
    real, timeout = engine.scheduler, flow.timeout_s
    # Admitted (nothing is ahead of it), then never processed: the worker is never started.
    stalled = Scheduler(real.cartoonizers, queue_size=4, name="stalled", on_outcome=real._on_outcome)
    engine.scheduler = stalled
    flow.timeout_s = 0.3
    try:
        before = client.get("/metrics").text
        r = client.post("/cartoonize", files={"image": ("me.jpg", unseen_jpeg)})
        assert r.status_code == 504 and r.json()["error"]["code"] == "deadline_exceeded"
        assert stalled.depth == 0  # dropped from the queue at once: the worker will never see it
        after = client.get("/metrics").text
        assert _counter(after, "deadline") == _counter(before, "deadline") + 1  # not "cancelled"
        assert _counter(after, "cancelled") == _counter(before, "cancelled")
    finally:
        engine.scheduler, flow.timeout_s = real, timeout


def _counter(metrics: str, outcome: str, client: str = "anonymous") -> float:
    prefix = f'toonserve_images_total{{client="{client}",outcome="{outcome}"}} '
    return next((float(line[len(prefix) :]) for line in metrics.splitlines() if line.startswith(prefix)), 0.0)


def test_metrics(client: TestClient, portrait_jpeg: bytes) -> None:
    client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)})
    text = client.get("/metrics").text
    assert 'toonserve_requests_total{client="anonymous",route="/cartoonize",status="200"}' in text
    assert (
        'toonserve_request_duration_seconds_bucket{client="anonymous",le="0.5",route="/cartoonize"}' in text
    )
    assert 'toonserve_stage_duration_seconds_count{stage="background"}' in text
    assert "toonserve_faces_per_image_count" in text
    assert 'toonserve_queue_depth{device="cpu"}' in text
    assert "toonserve_in_flight_requests" in text
    assert 'toonserve_images_total{client="anonymous",outcome="ok"}' in text


def test_openapi_documents_the_endpoints(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/cartoonize", "/cartoonize/batch", "/styles", "/healthz", "/readyz", "/metrics"} <= set(
        spec["paths"]
    )
    form = spec["paths"]["/cartoonize"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert form["schema"]["$ref"].startswith("#/components/schemas/")


def test_api_key_and_cors(model_dir: ReferenceModelDir, tmp_path: Path, portrait_jpeg: bytes) -> None:
    settings = make_settings(model_dir, tmp_path, api_key="s3cret", cors_origins="https://app.example")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)  # /readyz stays open
        assert c.get("/healthz").status_code == 200
        assert c.get("/metrics").status_code == 200
        r = c.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/styles", headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.get("/styles", headers={"X-API-Key": "s3cret"}).status_code == 200
        r = c.post(
            "/cartoonize",
            files={"image": ("me.jpg", portrait_jpeg)},
            headers={"Authorization": "Bearer s3cret", "Origin": "https://app.example"},
        )
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == "https://app.example"
        assert "Server-Timing" in r.headers["access-control-expose-headers"]
        r = c.get("/healthz", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers


@pytest.mark.slow
def test_a_failing_image_does_not_sink_its_batch(
    client: TestClient, portrait_jpeg: bytes, coffee_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.pipeline import Cartoonizer

    real_align = Cartoonizer.align

    def align(self: Cartoonizer, job: object) -> None:
        if getattr(job, "rgb").shape[1] == 300:  # noqa: B009 (the job type is private)
            raise RuntimeError("injected fault")
        real_align(self, job)  # type: ignore[arg-type]

    monkeypatch.setattr(Cartoonizer, "align", align)
    narrow = png_bytes(np.asarray(Image.open(io.BytesIO(portrait_jpeg)).resize((300, 300))))
    files = [
        ("images", ("a.jpg", portrait_jpeg)),
        ("images", ("b.png", narrow)),
        ("images", ("c.jpg", coffee_jpeg)),
    ]
    r = client.post("/cartoonize/batch", files=files, data={"response": "json"})
    assert r.status_code == 200
    results = r.json()["results"]
    assert [x["status"] for x in results] == ["ok", "error", "ok"]
    assert [x["http_status"] for x in results] == [200, 500, 200]
    assert results[1]["error"]["code"] == "internal_error" and "align stage" in results[1]["error"]["message"]
    assert results[0]["result"]["faces_stylized"] == 1


def test_two_image_parts_are_refused(client: TestClient, portrait_jpeg: bytes) -> None:
    files = [("image", ("a.jpg", portrait_jpeg)), ("image", ("b.jpg", portrait_jpeg))]
    r = client.post("/cartoonize", files=files)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "exactly one file" in r.json()["error"]["message"]


def test_a_full_queue_is_a_warning_not_an_error(
    client: TestClient, unseen_jpeg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    engine = service_state(client).engine
    real = engine.scheduler
    engine.scheduler = Scheduler(real.cartoonizers, queue_size=1, name="stalled")
    try:
        engine.scheduler.submit("anime", np.zeros((8, 8, 3), np.uint8), Options(), time.monotonic() + 60)
        with caplog.at_level("INFO"):
            assert client.post("/cartoonize", files={"image": ("me.jpg", unseen_jpeg)}).status_code == 503
    finally:
        engine.scheduler = real
    full = [rec for rec in caplog.records if "queue_full" in rec.getMessage()]
    assert len(full) == 1 and full[0].levelname == "WARNING"


def test_every_malformed_body_gets_its_own_code(client: TestClient, portrait_jpeg: bytes) -> None:
    png = png_bytes(np.zeros((32, 32, 3), np.uint8))
    cases = [
        ({"files": {"image": ("a" * 5004 + ".png", png)}}, 413, "header_too_large"),
        ({"files": {"image": ("a" * 300 + ".png", png)}}, 422, "filename_too_long"),
        (
            {"content": b"abc", "headers": {"content-type": "multipart/form-data"}},
            400,
            "malformed_multipart",
        ),
        (
            {"files": {"image": ("a.png", png)}, "data": {"style": "x" * (1024 * 1024 + 10)}},
            413,
            "field_too_large",
        ),
        ({"files": [("f", ("a", b"x"))] * 1001}, 413, "too_many_parts"),
    ]
    for kwargs, status, code in cases:
        r = client.post("/cartoonize", **kwargs)  # type: ignore[arg-type]
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (code, r.text[:300])
        assert r.headers["x-content-type-options"] == "nosniff"


def test_chunked_upload_over_the_limit_is_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * 1_000_000

    r = client.post(
        "/cartoonize", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xx"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


def test_echoed_input_is_cut_short(client: TestClient, portrait_jpeg: bytes) -> None:
    r = client.post("/cartoonize", files={"image": ("a.jpg", portrait_jpeg)}, data={"style": "x" * 100_000})
    assert r.status_code == 422 and len(r.text) < 400 and "(100000 characters)" in r.text


def test_outputs_beyond_the_limits_are_refused(client: TestClient) -> None:
    tiny = png_bytes(np.zeros((1, 1, 3), np.uint8))
    r = client.post("/cartoonize", files={"image": ("dot.png", tiny)}, data={"output_size": "8192"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"
    assert "times" in r.json()["error"]["message"]
    # In a batch each such image fails alone; when they all do, the batch is refused as a whole.
    photo = png_bytes(np.zeros((512, 512, 3), np.uint8))
    files = [("images", ("dot.png", tiny)), ("images", ("photo.png", photo))]
    r = client.post("/cartoonize/batch", files=files, data={"output_size": "1024", "response": "json"})
    assert r.status_code == 200 and [x["http_status"] for x in r.json()["results"]] == [422, 200]
    r = client.post("/cartoonize/batch", files=files[:1] * 2, data={"output_size": "1024"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "all_files_refused"
    assert r.json()["error"]["message"].startswith("none of the 2 files could be taken: dot.png: output_size")


def test_a_401_is_counted_under_its_route(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    settings = make_settings(model_dir, tmp_path, api_key="k")
    with TestClient(create_app(settings)) as c:
        assert c.post("/cartoonize", files={"image": ("a.jpg", b"x")}).status_code == 401
        metrics = c.get("/metrics").text
    assert 'toonserve_requests_total{client="anonymous",route="/cartoonize",status="401"} 1.0' in metrics
