"""The reference engine's adapter around ModelScope's pipeline.

ModelScope's pipeline itself cannot run here (its detector.pb and keypoints.pb are not available),
so the adapter is exercised with a stand-in that honours upstream's output contract for a photo
without a face: the TF background graph's BGR output at the processing size.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir, TFGenerator
from inference.errors import OptionsError
from inference.geometry import processing_shape, resize_rgb, upstream_pad16
from inference.pipeline import Cartoonizer, Options
from inference.reference import ModelScopeEngine, ReferenceEngineError, _modelscope_pipeline


def _complete_dir(model_dir: ReferenceModelDir, tmp_path: Path) -> Path:
    target = tmp_path / "anime"
    shutil.copytree(model_dir.path, target)
    for name in ("detector.pb", "keypoints.pb"):
        (target / name).write_bytes(b"stand-in")  # never opened by the stand-in pipeline
    return target


def test_missing_files_are_named(model_dir: ReferenceModelDir) -> None:
    with pytest.raises(
        ReferenceEngineError, match=r"lacks detector\.pb, keypoints\.pb.*toonserve download anime --all"
    ):
        ModelScopeEngine(model_dir.path)


def test_missing_extra_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "modelscope.pipelines", None)
    with pytest.raises(ReferenceEngineError, match=r"pip install 'toonserve\[reference\]'"):
        _modelscope_pipeline(tmp_path)


@pytest.mark.tf
def test_adapter_matches_our_background_only_result(
    model_dir: ReferenceModelDir, bg_pb: bytes, tmp_path: Path, cartoonizer: Cartoonizer
) -> None:
    bg = TFGenerator(bg_pb)  # the TF graph with the weights of model_dir's, which TF cannot run

    def upstream_without_face(_: Path) -> Any:
        def run(bgr: np.ndarray) -> dict[str, np.ndarray]:
            rgb = bgr[:, :, ::-1]
            h, w = processing_shape(rgb.shape[0], rgb.shape[1], 720)
            small = resize_rgb(np.ascontiguousarray(rgb), h, w)[:, :, ::-1]
            ph, pw = upstream_pad16(h, w)
            pad = np.full((ph, pw, 3), 255, np.uint8)
            pad[:h, :w] = small
            return {"output_img": bg(pad)[:h, :w]}  # BGR, not resized back: as upstream without a face

        return run

    engine = ModelScopeEngine(_complete_dir(model_dir, tmp_path), pipeline_factory=upstream_without_face)
    coffee = np.ascontiguousarray(np.repeat(np.repeat(photos.coffee(), 2, 0), 2, 1))  # 800×1200: resized
    ref = engine.run(coffee)
    ours = cartoonizer.run(coffee)
    assert ref.image.shape == coffee.shape == ours.image.shape
    diff = np.abs(ref.image.astype(int) - ours.image.astype(int))
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 3
    half = engine.run(coffee, Options(strength=0.5, output_size=(200, 300)))
    assert half.image.shape == (200, 300, 3)
    with pytest.raises(OptionsError, match="processing_size 720"):
        engine.run(coffee, Options(processing_size=1024))
    bg.close()
