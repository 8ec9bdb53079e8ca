"""Shared fixtures: synthetic reference graphs (built once per session) and real photos."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from devkit.reference_graphs import ReferenceModelDir, TFGenerator, build_generator_pb, write_model_dir
from inference.dctnet import DCTNetGenerator, load_generator
from inference.faces import FaceDetector, create_detector
from inference.models import ModelStore
from inference.pipeline import Cartoonizer
from inference.weights import StyleWeights, resolve

HEAD_SEED = 1
BG_SEED = 2


@pytest.fixture(scope="session")
def head_pb() -> bytes:
    return build_generator_pb(HEAD_SEED)


@pytest.fixture(scope="session")
def bg_pb() -> bytes:
    return build_generator_pb(BG_SEED)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory, head_pb: bytes, bg_pb: bytes) -> ReferenceModelDir:
    """A ModelScope-style directory (cartoon_h.pb, cartoon_bg.pb, alpha.jpg, configuration.json)."""
    return write_model_dir(tmp_path_factory.mktemp("models") / "anime", head_pb=head_pb, bg_pb=bg_pb)


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
        torch.device("cpu"), torch.float32, tmp_path_factory.mktemp("store"), model_dir.path.parent, False
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
