"""An app serving the synthetic anime style, ready, shared by the API tests of a module."""

from __future__ import annotations

import io
import itertools
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from api.state import ServiceState
from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from service.settings import Settings


def wait_ready(client: TestClient, timeout: float = 120.0) -> None:
    """Until ``/readyz`` says ready. The styles load in a moment here, so it asks often: asking every
    50 ms, the fast tests slept 3.4 s in all here."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.005)
    raise AssertionError(f"not ready: {client.get('/readyz').json()}")


def make_settings(model_dir: ReferenceModelDir, cache: Path, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        model_dir=model_dir.path.parent,
        cache_dir=cache,
        allow_download=False,
        device="cpu",
        # The exact mode, whatever this CPU: the tests compare outputs and report fields.
        dtype="float32",
        log_format="text",
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def client(model_dir: ReferenceModelDir, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = make_settings(
        model_dir, tmp_path_factory.mktemp("cache"), max_upload_bytes=3_000_000, max_pixels=4_000_000
    )
    with TestClient(create_app(settings)) as c:
        wait_ready(c)
        yield c


def jobs_settings(model_dir: ReferenceModelDir, tmp: Path, **overrides: object) -> Settings:
    """The settings of a service with jobs of its own: cache and data directory under ``tmp``."""
    values: dict[str, object] = {"data_dir": tmp / "data", "dtype": "auto", **overrides}
    return make_settings(model_dir, tmp / "cache", **values)


@pytest.fixture
def jobs_client(
    model_dir: ReferenceModelDir, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[TestClient]:
    """A service of the test's own (its jobs in ``tmp_path``); parametrize it indirectly with a dict of
    settings to change."""
    overrides = getattr(request, "param", {})
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, **overrides))) as client:
        wait_ready(client)
        yield client


def small_jpeg(rgb: np.ndarray, side: int = 256) -> bytes:
    """``rgb`` as a ``side``×``side`` JPEG."""
    return jpeg_bytes(np.asarray(Image.fromarray(rgb).resize((side, side))))


def sse_events(lines: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
    """The ``(event, data)`` pairs of a Server-Sent Events stream's lines (data as JSON)."""
    out = []
    event = ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
    return out


def service_state(client: TestClient) -> ServiceState:
    state: ServiceState = client.app.state.toonserve  # type: ignore[attr-defined]
    return state


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def portrait_jpeg() -> bytes:
    return jpeg_bytes(photos.astronaut())


_unseen = itertools.count(1)


def unseen_portrait() -> bytes:
    """The astronaut as a JPEG no earlier call gave (its comment differs, its pixels do not): a photo
    the service's result cache has not seen, for tests that need the models to run (a full queue, a
    deadline)."""
    buf = io.BytesIO()
    Image.fromarray(photos.astronaut()).save(buf, "JPEG", quality=90, comment=f"unseen {next(_unseen)}")
    return buf.getvalue()


@pytest.fixture
def unseen_jpeg() -> bytes:
    """:func:`unseen_portrait`, one per test."""
    return unseen_portrait()


@pytest.fixture(scope="session")
def coffee_jpeg() -> bytes:
    return jpeg_bytes(photos.coffee())
