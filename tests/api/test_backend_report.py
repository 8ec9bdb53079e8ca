"""/readyz and /styles say which generator backend runs each loaded style and what decided it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit.reference_graphs import ReferenceModelDir
from inference import ort
from inference.backends import CANDIDATES
from service.app import create_app
from tests.api.conftest import make_settings, wait_ready

# A service that exports and times its engines at start-up: about 8 s.
pytestmark = pytest.mark.slow

FIELDS = ("backend", "backend_reason", "backend_times_ms", "backend_excluded")


@pytest.fixture(scope="module")
def client(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """A service that decides its backend by measuring (the other tests' services pin onednn)."""
    settings = make_settings(model_dir, tmp_path_factory.mktemp("cache"), backend="auto")
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def _check_decision(style: dict[str, Any]) -> None:
    assert style["backend"] in CANDIDATES
    assert style["backend_reason"].startswith("auto: ")  # this module's service leaves TOONSERVE_BACKEND auto
    times, excluded = style["backend_times_ms"], style["backend_excluded"]
    # Every candidate is either timed or excluded with a reason (or, alone within the bound, neither).
    assert set(times).isdisjoint(excluded) and set(excluded) <= set(CANDIDATES)
    if times:
        assert style["backend"] in times and set(times) | set(excluded) == set(CANDIDATES)
        assert all(isinstance(ms, float) and ms > 0 for ms in times.values())
    assert all(isinstance(why, str) and why for why in excluded.values())


def test_readyz_reports_each_styles_backend(client: TestClient) -> None:
    body = client.get("/readyz").json()
    _check_decision(body["styles"]["anime"])


def test_styles_reports_each_loaded_styles_backend(client: TestClient) -> None:
    styles = {s["name"]: s for s in client.get("/styles").json()["styles"]}
    _check_decision(styles["anime"])
    assert {k: styles["anime"][k] for k in FIELDS} == {
        k: client.get("/readyz").json()["styles"]["anime"][k] for k in FIELDS
    }
    assert all(styles["3d"][k] is None for k in FIELDS)  # not configured here


def test_the_fields_are_documented_in_openapi(client: TestClient) -> None:
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model in ("StyleReadiness", "StyleInfo"):
        properties = schemas[model]["properties"]
        for name in FIELDS:
            assert properties[name].get("description"), (model, name)
        backend = properties["backend"]["anyOf"][0]
        assert backend["enum"] == list(CANDIDATES)


@pytest.mark.slow  # exports the graphs (about 6 s on 2 cores) unless this process already traced one
@pytest.mark.skipif(
    ort.missing_runtime() is not None or ort.missing_exporter() is not None,
    reason="needs the onnx and onnxruntime extras",
)
def test_the_service_runs_on_onnxruntime_when_told_to(
    model_dir: ReferenceModelDir, tmp_path: Path, portrait_jpeg: bytes
) -> None:
    settings = make_settings(model_dir, tmp_path / "cache", backend="onnxruntime", dtype="auto")
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        ready = client.get("/readyz").json()
        assert ready["dtype"] == "float32" and "onnxruntime runs float32 only" in ready["dtype_reason"]
        anime = ready["styles"]["anime"]
        assert (anime["backend"], anime["backend_reason"]) == ("onnxruntime", "set by TOONSERVE_BACKEND")
        assert anime["backend_times_ms"] == {} and anime["backend_excluded"] == {}
        r = client.post("/cartoonize", files={"image": ("me.jpg", portrait_jpeg, "image/jpeg")})
        assert r.status_code == 200, r.text
    # The graphs were cached beside the converted weights for the next start.
    assert len(list((tmp_path / "cache" / "converted" / "anime").glob("*.onnx"))) == 2
