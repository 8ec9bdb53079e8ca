"""Shared fixtures: synthetic model graphs (built once per session) and the models made from them.

``model_dir`` and everything built on it are TensorFlow-free (protobuf-only graphs with the reference
weights); ``head_pb``, ``bg_pb`` and ``tf_head`` build and run the TensorFlow reference graphs, with the
same weights, and only tests marked ``tf`` may use them (checked at collection).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from devkit.redis_server import RedisServer
from devkit.reference_graphs import (
    ReferenceModelDir,
    TFGenerator,
    build_generator_pb,
    write_fast_model_dir,
)
from inference.dctnet import DCTNetGenerator, load_generator
from inference.faces import FaceDetector, create_detector
from inference.models import ModelStore
from inference.pipeline import Cartoonizer
from inference.weights import StyleWeights, resolve

HEAD_SEED = 1
BG_SEED = 2

#: Fixtures that build or run TensorFlow graphs; a test that uses one (directly or through another
#: fixture) must be marked ``tf``, so that ``-m "not tf"`` never imports TensorFlow.
TF_FIXTURES = frozenset({"head_pb", "bg_pb", "tf_head", "tf_mtcnn", "upstream_flow"})


#: Fixtures that start a server process; a test that uses one must be marked ``live``, so that
#: ``make check`` needs neither the process nor its program.
LIVE_FIXTURES = frozenset({"redis_server"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for fixtures, marker, what in (
        (TF_FIXTURES, "tf", "a TensorFlow fixture"),
        (LIVE_FIXTURES, "live", "a server"),
    ):
        unmarked = [
            item.nodeid
            for item in items
            if fixtures & set(getattr(item, "fixturenames", ())) and item.get_closest_marker(marker) is None
        ]
        if unmarked:
            raise pytest.UsageError(
                f"these tests use {what} but are not marked {marker}: " + ", ".join(unmarked)
            )


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A run without ``tf`` tests (``make check``) must not have imported TensorFlow: it costs seconds
    and would mean a test needs TensorFlow without the marker."""
    if exitstatus != 0 or "tensorflow" not in sys.modules:
        return
    if any(item.get_closest_marker("tf") for item in session.items):
        return
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line("ERROR: TensorFlow was imported although no test marked tf ran", red=True)


@pytest.fixture(scope="session")
def head_pb() -> bytes:
    return build_generator_pb(HEAD_SEED)


@pytest.fixture(scope="session")
def bg_pb() -> bytes:
    return build_generator_pb(BG_SEED)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> ReferenceModelDir:
    """A ModelScope-style directory (cartoon_h.pb, cartoon_bg.pb, alpha.jpg, configuration.json).

    Its graphs are written without TensorFlow and hold the same weights and eps as ``head_pb`` and
    ``bg_pb`` (bit for bit; tests/inference/test_convert.py proves it), so what is converted from
    them can be compared with TensorFlow runs of those; TensorFlow cannot run them itself.
    """
    return write_fast_model_dir(
        tmp_path_factory.mktemp("models") / "anime", head_seed=HEAD_SEED, bg_seed=BG_SEED
    )


@pytest.fixture(scope="session")
def style_weights(tmp_path_factory: pytest.TempPathFactory, model_dir: ReferenceModelDir) -> StyleWeights:
    """The synthetic anime style, converted into a session cache."""
    return resolve("anime", tmp_path_factory.mktemp("cache"), model_dir.path.parent, allow_download=False)


@pytest.fixture(scope="session")
def head_model(style_weights: StyleWeights) -> DCTNetGenerator:
    return load_generator(style_weights.head)


@pytest.fixture(scope="session")
def tf_head(head_pb: bytes) -> Iterator[TFGenerator]:
    gen = TFGenerator(head_pb, prefix="model_anime_head")
    yield gen
    gen.close()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory, model_dir: ReferenceModelDir) -> ModelStore:
    """The synthetic anime style (head seed 1, background seed 2) resident on the CPU, float32."""
    store = ModelStore(
        torch.device("cpu"),
        torch.float32,
        tmp_path_factory.mktemp("store"),
        model_dir.path.parent,
        False,
        backend="onednn",
    )
    store.load("anime")
    return store


@pytest.fixture(scope="session")
def detector() -> FaceDetector:
    return create_detector("mtcnn", "cpu")


@pytest.fixture(scope="session")
def cartoonizer(model_store: ModelStore, detector: FaceDetector) -> Cartoonizer:
    return Cartoonizer(model_store.get("anime"), detector)


@pytest.fixture(autouse=True, scope="session")
def _deterministic_torch() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_backend() -> None:
    """Every service the tests start, in this process or as a server process, runs the generators on
    oneDNN unless a test asks otherwise: ``auto`` measures at start-up, and on a busy machine two
    services could choose differently, a level apart in a few pixels, where tests compare their
    outputs. The tests of ``auto`` itself set it explicitly. Nor do they warm up at the processing
    size (a second or more per start, each test's service started afresh); its own test asks for it."""
    os.environ.setdefault("TOONSERVE_BACKEND", "onednn")
    os.environ.setdefault("TOONSERVE_WARMUP", "false")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh ``redis-server`` on a free loopback port (about 50 ms to start), stopped afterwards.
    Tests that use it start a server process, so they are marked ``live``; without ``redis-server``
    they fail (``make test`` installs it)."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
