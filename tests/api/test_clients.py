"""Named clients: keys from the settings and a keys file, addresses behind trusted proxies, each
client's queue share and rate (429 with Retry-After and the RateLimit fields), and no input that can
make the service refuse an ordinary photo."""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from starlette.datastructures import Headers

from api.clients import Clients, RateLimiter, load_keys, parse_keys, parse_networks
from devkit.reference_graphs import ReferenceModelDir
from inference.errors import ConfigurationError
from inference.pipeline import Options
from service.app import create_app
from serving.scheduler import Scheduler
from serving.tickets import Client
from tests.api.conftest import make_settings, png_bytes, service_state, wait_ready

# -- keys ------------------------------------------------------------------------------------------


def test_keys_from_the_variables_and_a_file(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text(
        "# the mobile app and a partner\nmobile=m0b1le-key queue_size=4\n\n"
        "partner=p4rtner images_per_minute=30\n"
    )
    keys = load_keys("s3cret", "web=w3b,cli=c1i", keys_file)
    assert [k.name for k in keys] == ["default", "web", "cli", "mobile", "partner"]
    assert keys[3].queue_size == 4 and keys[3].images_per_minute is None
    assert keys[4].images_per_minute == 30
    clients = Clients(keys)
    assert clients.auth and clients.names == ("default", "web", "cli", "mobile", "partner")
    assert clients.match("w3b") is keys[1] and clients.match("c1i") is keys[2]
    assert clients.match("w3") is None and clients.match(None) is None and clients.match("") is None
    # Only digests are kept.
    assert all(b"w3b" not in repr(k).encode() for k in keys)


@pytest.mark.parametrize(
    ("api_key", "api_keys", "message"),
    [
        (None, "web", "entry 1: expected name=key"),
        (None, "web=", "the key of 'web' is empty"),
        (None, "w!b=k1", "key name 'w!b' must be"),
        (None, "a=k1,a=k2", "more than one API key is named a"),
        (None, "a=same,b=same", "the same API key is configured under two names"),
        ("s3cret", "default=other", "more than one API key is named default"),
        (None, "a=k1 burst=5", "'burst' is not one of queue_size=N, images_per_minute=N"),
        (None, "a=k1 queue_size=0", "queue_size at least 1"),
    ],
)
def test_malformed_keys_stop_the_service_without_showing_a_key(
    api_key: str | None, api_keys: str, message: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_keys(api_key, api_keys, None)
    assert message in str(info.value)
    for secret in ("k1", "k2", "same", "other"):
        assert f"={secret}" not in str(info.value)


def test_an_unreadable_keys_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_keys(None, None, tmp_path / "missing")
    assert parse_keys(["", "  # nothing", "x=y"], "here")[0].name == "x"


def test_an_empty_api_key_is_a_configuration_error(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="set but empty"):
        make_settings(model_dir, tmp_path, api_key=" ")


# -- addresses -------------------------------------------------------------------------------------


def _scope(peer: str) -> dict[str, object]:
    return {"type": "http", "client": (peer, 50000), "headers": []}


def test_without_keys_callers_are_told_apart_by_address_only_through_trusted_proxies() -> None:
    clients = Clients(trusted_proxies=parse_networks(["10.0.0.0/8", "::1"]), queue_size=5)
    forwarded = Headers({"x-forwarded-for": "6.6.6.6, 203.0.113.7, 10.1.2.3"})
    # Through two trusted hops: the nearest untrusted address (not what the client wrote first).
    assert clients.address(_scope("10.9.9.9"), forwarded) == "203.0.113.7"
    # From an untrusted peer the header is not believed.
    assert clients.address(_scope("198.51.100.1"), forwarded) == "198.51.100.1"
    # Garbage in the header falls back to the peer.
    assert clients.address(_scope("::1"), Headers({"x-forwarded-for": "not-an-ip"})) == "::1"
    caller = clients.caller(_scope("10.9.9.9"), forwarded)
    assert caller is not None
    assert caller.client == Client("anonymous", "address:203.0.113.7", 5)
    assert caller.images_per_minute is None
    with pytest.raises(ValueError, match="not an IP address"):
        parse_networks(["10.0.0.0/33"])


def test_with_keys_the_key_decides_and_its_limits_apply() -> None:
    keys = parse_keys(["gold=g queue_size=9 images_per_minute=100", "std=s"], "x")
    clients = Clients(keys, queue_size=3, images_per_minute=10)
    gold = clients.caller(_scope("1.2.3.4"), Headers({"x-api-key": "g"}))
    std = clients.caller(_scope("1.2.3.4"), Headers({"authorization": "Bearer s"}))
    assert gold is not None and std is not None
    assert (gold.client, gold.images_per_minute) == (Client("gold", "gold", 9), 100)
    assert (std.client, std.images_per_minute) == (Client("std", "std", 3), 10)
    assert clients.caller(_scope("1.2.3.4"), Headers({"x-api-key": "nope"})) is None


# -- rate ------------------------------------------------------------------------------------------


def test_the_rate_limiter_is_a_token_bucket() -> None:
    now = [0.0]
    rates = RateLimiter(clock=lambda: now[0])
    first = rates.take("a", 5, 6)  # 6 a minute, 5 at once
    assert first.allowed and first.remaining == 1 and first.reset_s == 50
    refused = rates.take("a", 2, 6)
    assert not refused.allowed and refused.remaining == 1 and refused.retry_after == 10
    assert refused.headers() == {
        "RateLimit-Policy": '"images";q=6;w=60',
        "RateLimit": '"images";r=1;t=50',
        "Retry-After": "10",
    }
    assert rates.take("b", 6, 6).allowed  # every key has its own bucket
    now[0] = 10.0
    assert rates.take("a", 2, 6).allowed


# -- the service -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys"
    keys.write_text("slow=slow-key images_per_minute=2\nsmall=small-key queue_size=1\n")
    settings = make_settings(
        model_dir, tmp / "cache", api_keys="alice=alice-key,bob=bob-key", api_keys_file=keys, queue_size=8
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def _photo() -> bytes:
    return png_bytes(np.full((64, 48, 3), 150, np.uint8))


def test_each_named_key_is_a_client_in_metrics_and_logs(
    keyed: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="toonserve.access"):
        for key in ("alice-key", "bob-key"):
            r = keyed.post("/cartoonize", files={"image": ("a.png", _photo())}, headers={"X-API-Key": key})
            assert r.status_code == 200
            assert "RateLimit" not in r.headers  # no rate for these two
        assert keyed.post("/cartoonize", headers={"X-API-Key": "eve-key"}).status_code == 401
    text = keyed.get("/metrics").text
    for name in ("alice", "bob"):
        assert f'toonserve_requests_total{{client="{name}",route="/cartoonize",status="200"}} 1.0' in text
        assert f'toonserve_images_total{{client="{name}",outcome="no_face"}} 1.0' in text
    assert 'toonserve_requests_total{client="anonymous",route="/cartoonize",status="401"} 1.0' in text
    assert '"eve' not in text and "alice-key" not in text
    lines = [r for r in caplog.records if r.name == "toonserve.access" and "/cartoonize" in r.getMessage()]
    assert [getattr(r, "client", None) for r in lines] == ["alice", "bob", "anonymous"]
    assert not any("-key" in r.getMessage() for r in caplog.records)


def test_a_client_over_its_rate_gets_429_with_the_ratelimit_fields(keyed: TestClient) -> None:
    headers = {"X-API-Key": "slow-key"}
    ok = keyed.post("/cartoonize", files={"image": ("a.png", _photo())}, headers=headers)
    assert ok.status_code == 200
    assert ok.headers["ratelimit-policy"] == '"images";q=2;w=60'
    assert ok.headers["ratelimit"].startswith('"images";r=1;t=')
    files = [("images", ("a.png", _photo())), ("images", ("b.png", _photo()))]
    refused = keyed.post("/cartoonize/batch", files=files, headers=headers)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_requests"
    assert "2 images a minute and has 1 left" in refused.json()["error"]["message"]
    assert 1 <= int(refused.headers["retry-after"]) <= 30
    assert refused.headers["ratelimit"].startswith('"images";r=1;t=')
    never = keyed.post("/cartoonize/batch", files=files * 2, headers=headers)
    assert never.status_code == 413 and "more than this client may send in a minute" in never.text
    # Another client is not held back.
    other = keyed.post("/cartoonize/batch", files=files, headers={"X-API-Key": "alice-key"})
    assert other.status_code == 200


def test_a_client_over_its_queue_share_gets_429_while_others_get_in(keyed: TestClient) -> None:
    engine = service_state(keyed).engine
    real = engine.scheduler
    stalled = Scheduler(real.cartoonizers, queue_size=8, name="stalled")  # never started: nothing drains
    engine.scheduler = stalled
    try:
        stalled.submit(
            "anime",
            np.zeros((8, 8, 3), np.uint8),
            Options(no_face="passthrough"),
            time.monotonic() + 60,
            client=Client("small", "small"),
        )
        r = keyed.post(
            "/cartoonize", files={"image": ("a.png", _photo())}, headers={"X-API-Key": "small-key"}
        )
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"
        assert "may have at most 1" in r.json()["error"]["message"]
        assert int(r.headers["retry-after"]) >= 1
        assert r.headers["ratelimit-policy"] == '"queue";q=1'
        assert r.headers["ratelimit"] == f'"queue";r=0;t={r.headers["retry-after"]}'
        # Alice's photo is admitted (it would wait behind the stalled worker; the client gives up).
        assert stalled.admit([1000], time.monotonic() + 60, Client("alice", "alice", 16)).slots
    finally:
        engine.scheduler = real


def test_openapi_declares_429_with_its_headers(keyed: TestClient) -> None:
    spec = keyed.get("/openapi.json").json()
    for route in ("/cartoonize", "/cartoonize/batch"):
        refused = spec["paths"][route]["post"]["responses"]["429"]
        assert "too_many_requests" in refused["description"]
        assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(refused["headers"])


def test_openapi_says_which_routes_need_a_key_and_how_to_send_it(
    keyed: TestClient, model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    """Swagger's Authorize button comes from these; "Try it out" then sends the key."""
    spec = keyed.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKeyHeader"] == {
        **schemes["ApiKeyHeader"],
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert schemes["Bearer"]["scheme"] == "bearer"
    for route, method in (
        ("/cartoonize", "post"),
        ("/jobs", "post"),
        ("/styles", "get"),
        ("/admin/reload", "post"),
    ):
        assert spec["paths"][route][method]["security"] == [{"ApiKeyHeader": []}, {"Bearer": []}], route
    for route in ("/healthz", "/readyz", "/metrics"):
        assert "security" not in spec["paths"][route]["get"], route
    # Each declared way works.
    assert keyed.get("/styles", headers={"X-API-Key": "alice-key"}).status_code == 200
    assert keyed.get("/styles", headers={"Authorization": "Bearer alice-key"}).status_code == 200
    # Without keys nothing is declared.
    open_spec = create_app(make_settings(model_dir, tmp_path / "cache")).openapi()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert "security" not in open_spec["paths"]["/cartoonize"]["post"]


# -- no input takes the service down -----------------------------------------------------------------


def _png_of(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (90, 120, 200)).save(buf, "PNG")
    return buf.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 160, 120)).save(buf, "JPEG")
    return buf.getvalue()


ODD: dict[str, tuple[bytes, int]] = {
    "1x1": (_png_of(1, 1), 200),
    "2x2": (_png_of(2, 2), 200),
    "16x16": (_png_of(16, 16), 200),
    "30000x2": (_png_of(30000, 2), 200),
    "2x30000": (_png_of(2, 30000), 200),
    "truncated": (_jpeg(640, 480)[:400], 400),
    "corrupt": (_jpeg(640, 480)[:200] + b"\x00" * 900 + _jpeg(640, 480)[1100:], 400),
    "not an image": (b"%PDF-1.7 hello", 415),
}


@pytest.mark.slow
def test_after_any_odd_input_an_ordinary_photo_is_served(
    model_dir: ReferenceModelDir, tmp_path: Path, portrait_jpeg: bytes
) -> None:
    """Each odd input, then an ordinary photo: the odd one gets its own answer (never a 5xx), the
    ordinary one always 200 (a 1×1 PNG once made every later photo 503 until a restart)."""
    with TestClient(create_app(make_settings(model_dir, tmp_path))) as c:
        wait_ready(c)
        for name, (data, expected) in ODD.items():
            r = c.post("/cartoonize", files={"image": (f"{name}.bin", data)})
            assert r.status_code == expected, (name, r.text)
            r = c.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)})
            assert r.status_code == 200, (name, r.text)
        files = [("images", (f"{n}.bin", d)) for n, (d, _) in ODD.items()]
        r = c.post(
            "/cartoonize/batch",
            files=[*files, ("images", ("me.jpg", portrait_jpeg))],
            data={"response": "json"},
        )
        assert r.status_code == 200
        statuses = [item["http_status"] for item in r.json()["results"]]
        assert statuses == [expected for _, expected in ODD.values()] + [200]
        r = c.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg)})
        assert r.status_code == 200
