"""Styles load and fail independently; a failed style is retried in the background and recovers."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from service.settings import Settings
from serving.retry import backoff_s


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_s(n, 5.0, 300.0) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 300, 300]
    assert backoff_s(3, 5.0, 12.0) == 12.0


Styles = dict[str, dict[str, Any]]


def _wait(
    client: TestClient, predicate: Callable[[Styles], bool], timeout: float = 60.0, **request: Any
) -> Styles:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        styles = {s["name"]: s for s in client.get("/styles", **request).json()["styles"]}
        if predicate(styles):
            return styles
        time.sleep(0.05)
    raise AssertionError(f"timed out: {client.get('/styles').json()}")


def _settings(models: Path, cache: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        model_dir=models, cache_dir=cache, allow_download=False, device="cpu", log_format="text"
    )
    return Settings(**{**values, **overrides})  # type: ignore[arg-type]


@pytest.mark.slow
def test_a_missing_style_does_not_block_the_others_and_recovers(
    model_dir: ReferenceModelDir, tmp_path: Path, portrait_jpeg: bytes
) -> None:
    models = tmp_path / "models"
    shutil.copytree(model_dir.path, models / "anime")
    settings = _settings(models, tmp_path / "cache", styles="anime,3d", weights_retry_max_s=0.3)
    with TestClient(create_app(settings)) as client:
        styles = _wait(client, lambda s: s["3d"]["state"] == "failed" and s["anime"]["loaded"])
        message = str(styles["3d"]["error"])
        assert "no weights for style '3d'" in message
        for fix in ("toonserve download 3d", "TOONSERVE_MODEL_DIR", "TOONSERVE_ALLOW_DOWNLOAD=true"):
            assert fix in message, fix

        ready = client.get("/readyz")
        assert ready.status_code == 200  # the default style is in
        body = ready.json()
        assert body["styles"]["anime"]["state"] == "loaded"
        assert body["styles"]["3d"]["state"] in ("failed", "loading")

        files = {"image": ("me.jpg", portrait_jpeg, "image/jpeg")}
        assert client.post("/cartoonize", files=files).status_code == 200
        assert client.post("/cartoonize", files=files, data={"style": "anime"}).status_code == 200
        r = client.post("/cartoonize", files=files, data={"style": "3d"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] in ("style_unavailable", "not_ready")
        assert int(r.headers["retry-after"]) >= 1

        # The weights appear (a volume mounted late, the network back): the next attempt loads them.
        shutil.copytree(model_dir.path, models / "3d")
        _wait(client, lambda s: bool(s["3d"]["loaded"]))
        assert client.post("/cartoonize", files=files, data={"style": "3d"}).status_code == 200
        readiness = client.get("/readyz").json()["styles"]["3d"]
        backend = {k: readiness.pop(k) for k in list(readiness) if k.startswith("backend")}
        precision = {k: readiness.pop(k) for k in list(readiness) if k.startswith("dtype")}
        assert readiness == {
            "state": "loaded",
            "error": None,
            "next_attempt_in_s": None,
            "source": "demo",  # the test weights are demo weights, and say so
        }
        # Which generator backend runs it (tests/api/test_backend_report.py checks the rest).
        assert backend["backend"] in ("onednn", "eager", "onnxruntime") and backend["backend_reason"]
        # And in which precision, and why (tests/service/test_app.py checks them against /styles).
        assert precision["dtype"] in ("float32", "bfloat16", "float16", "int8") and precision["dtype_reason"]


def test_a_failed_default_style_is_not_ready_with_its_reason(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "empty", tmp_path / "cache", weights_retry_max_s=60)
    with TestClient(create_app(settings)) as client:
        styles = _wait(client, lambda s: s["anime"]["state"] == "failed")
        assert 0 < styles["anime"]["next_attempt_in_s"] <= 5
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert "anime: failed (next attempt in" in r.json()["error"]["message"]
        assert 1 <= int(r.headers["retry-after"]) <= 5
        r = client.post("/cartoonize", files={"image": ("x.jpg", b"\xff\xd8\xff")})
        assert r.status_code == 503 and r.json()["error"]["code"] == "style_unavailable"
        assert "no weights for style 'anime'" in r.json()["error"]["message"]


@pytest.mark.parametrize("styles", ["anime"])
def test_unconfigured_style_is_422_before_the_upload_is_read(
    model_dir: ReferenceModelDir, tmp_path: Path, styles: str
) -> None:
    settings = _settings(model_dir.path.parent, tmp_path / "cache", styles=styles)
    with TestClient(create_app(settings)) as client:
        r = client.post("/cartoonize", files={"image": ("x.jpg", b"junk")}, data={"style": "sketch"})
        assert r.status_code == 422 and r.json()["error"]["code"] == "style_not_loaded"
        assert "not configured on this server; configured: anime" in r.json()["error"]["message"]


@pytest.mark.slow
def test_weights_copied_in_are_loaded_in_seconds_whatever_the_backoff(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, portrait_jpeg: bytes
) -> None:
    """The next attempt is ten minutes away; the files appear (copied the slow way, file by file):
    the style is ready within 10 s, and was not tried on the half-copied directory."""
    monkeypatch.setattr("serving.engine.backoff_s", lambda *_: 600.0)
    models = tmp_path / "models"
    settings = _settings(models, tmp_path / "cache")
    with TestClient(create_app(settings)) as client:
        styles = _wait(client, lambda s: s["anime"]["state"] == "failed")
        assert styles["anime"]["next_attempt_in_s"] > 500
        target = models / "anime"
        target.mkdir(parents=True)
        for source in sorted(model_dir.path.iterdir()):
            shutil.copyfile(source, target / source.name)
            time.sleep(0.5)
        appeared = time.monotonic()
        styles = _wait(client, lambda s: bool(s["anime"]["loaded"]), timeout=10.0)
        assert time.monotonic() - appeared <= 10.0
        assert str(target) in str(styles["anime"]["weights_source"])
        files = {"image": ("me.jpg", portrait_jpeg, "image/jpeg")}
        assert client.post("/cartoonize", files=files).status_code == 200


def test_admin_reload_tries_failed_styles_now(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("serving.engine.backoff_s", lambda *_: 600.0)
    monkeypatch.setattr("serving.engine.LOOK_S", 600.0)  # only the reload can find the files
    models = tmp_path / "models"
    settings = _settings(models, tmp_path / "cache", api_key="k" * 24)
    key = {"X-API-Key": "k" * 24}
    with TestClient(create_app(settings)) as client:
        _wait(client, lambda s: s["anime"]["state"] == "failed", headers=key)
        assert client.post("/admin/reload").status_code == 401
        shutil.copytree(model_dir.path, models / "anime")
        r = client.post("/admin/reload", headers=key)
        assert r.status_code == 202, r.text
        assert r.json()["retrying"] == ["anime"]
        _wait(client, lambda s: bool(s["anime"]["loaded"]), headers=key)
        r = client.post("/admin/reload", headers=key)
        assert r.status_code == 202 and r.json()["retrying"] == []


def test_the_service_warms_up_at_the_processing_size_and_one_shot_tools_do_not(tmp_path: Path) -> None:
    from service.factory import build_engine

    settings = _settings(tmp_path / "models", tmp_path / "cache", warmup=True, processing_size=720)
    assert build_engine(settings).warmup_size == (720, 960)  # a 3:4 photo
    assert build_engine(settings, retry=False).warmup_size is None  # the CLI, benchmarks
    assert build_engine(settings.model_copy(update={"warmup": False})).warmup_size is None


@pytest.mark.slow
def test_the_default_style_warms_up_before_the_service_is_ready(
    model_dir: ReferenceModelDir, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Blank photos of the processing size go through the default style before /readyz says ready:
    the detector has its pyramid for that size, and the log says so before "ready"."""
    models = tmp_path / "models"
    shutil.copytree(model_dir.path, models / "anime")
    settings = _settings(models, tmp_path / "cache", warmup=True, processing_size=256)
    with caplog.at_level(logging.INFO, logger="serving.engine"), TestClient(create_app(settings)) as client:
        _wait(client, lambda s: bool(s["anime"]["loaded"]))
        assert client.get("/readyz").status_code == 200
        detector = client.app.state.toonserve.engine.detector  # type: ignore[attr-defined]
        assert (256, 341) in detector._layouts
    messages = [r.getMessage() for r in caplog.records if r.name == "serving.engine"]
    warmed = next(i for i, m in enumerate(messages) if m.startswith("style anime: warmed up at 256×341 in "))
    assert warmed < messages.index("style anime ready on cpu")
