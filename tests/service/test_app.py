"""The app factory and lifespan: probes, readiness after warm-up, the styles listing, error shape."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from devkit.reference_graphs import ReferenceModelDir
from inference.models import choose_dtype, int8_unconsidered
from service.app import create_app
from service.settings import Settings


def wait_ready(client: TestClient, timeout: float = 60.0) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get("/readyz")
        if r.status_code == 200:
            body: dict[str, object] = r.json()
            return body
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout}s: {client.get('/readyz').json()}")


@pytest.mark.slow  # the defaults measure the backends, and on a CPU with VNNI make and measure int8: ~20 s
def test_ready_after_loading_and_styles_listing(model_dir: ReferenceModelDir, tmp_path: Path) -> None:
    # The defaults (the tests' other services pin the backend: tests/conftest.py).
    settings = Settings(
        model_dir=model_dir.path.parent,
        cache_dir=tmp_path,
        allow_download=False,
        device="cpu",
        backend="auto",
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = wait_ready(client)
        cpu = torch.device("cpu")
        auto = choose_dtype("auto", cpu)  # TOONSERVE_DTYPE is auto by default
        readiness: dict[str, dict[str, object]] = ready["styles"]  # type: ignore[assignment]
        anime = readiness["anime"]
        backend = {k: anime.pop(k) for k in list(anime) if k.startswith("backend")}
        assert backend["backend"] in ("onednn", "eager", "onnxruntime")
        assert str(backend["backend_reason"]).startswith("auto: ")  # TOONSERVE_BACKEND is auto by default
        precision = {k: anime.pop(k) for k in ("dtype", "dtype_reason")}
        reason = str(precision["dtype_reason"])
        if int8_unconsidered("auto", cpu, "auto") is None:  # int8 weighed for the style as it loaded
            if precision["dtype"] == "int8":
                assert (
                    reason.startswith("auto: int8 measured within ") and backend["backend"] == "onnxruntime"
                )
            else:
                assert precision["dtype"] == auto.name and reason.startswith(f"{auto.reason}; int8 not ")
        else:
            assert precision["dtype"] == auto.name and "int8 not considered: " in reason
        assert ready == {
            "status": "ready",
            "device": "cpu",
            "dtype": precision["dtype"],  # the default style's
            "dtype_reason": reason,
            "default_style": "anime",
            "styles": {
                "anime": {"state": "loaded", "error": None, "next_attempt_in_s": None, "source": "demo"}
            },
        }
        assert auto.reason.startswith("auto: ")
        styles = {s["name"]: s for s in client.get("/styles").json()["styles"]}
        assert len(styles) == 7
        assert (
            styles["anime"]["loaded"] and styles["anime"]["default"] and styles["anime"]["state"] == "loaded"
        )
        assert styles["anime"]["weights_source"].startswith("converted from")
        assert not styles["3d"]["loaded"] and not styles["3d"]["configured"]
        assert styles["3d"]["state"] == "not_configured"
        assert (styles["anime"]["dtype"], styles["anime"]["dtype_reason"]) == (precision["dtype"], reason)
        assert styles["3d"]["dtype"] is None and styles["3d"]["dtype_reason"] is None
        listing = client.get("/styles").json()
        assert (listing["dtype"], listing["dtype_reason"]) == (precision["dtype"], reason)


def test_not_ready_says_why(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path / "models", cache_dir=tmp_path, allow_download=False, device="cpu")
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = client.get("/readyz")
            if "no weights" in r.text:
                break
            time.sleep(0.05)
        assert r.status_code == 503
        assert r.headers["retry-after"] == "5"
        err = r.json()["error"]
        assert err["code"] == "not_ready"
        assert (
            "no weights for style 'anime'" in err["message"] and "toonserve download anime" in err["message"]
        )
        assert client.get("/healthz").status_code == 200
        styles = {s["name"]: s for s in client.get("/styles").json()["styles"]}
        assert "no weights" in styles["anime"]["error"]


def test_unknown_route_uses_the_error_shape(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, cache_dir=tmp_path, allow_download=False, device="cpu")
    with TestClient(create_app(settings)) as client:
        r = client.get("/nope")
        assert r.status_code == 404
        assert r.json() == {"error": {"code": "not_found", "message": "Not Found"}}
