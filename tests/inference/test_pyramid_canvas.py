"""The detector's input handling (inference.faces.mtcnn): the packed pyramid's levels against an
independent float64 area resize (no TensorFlow needed), and the prepared pixels whatever the input's
layout.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from devkit import photos
from inference.faces import MTCNNConfig, MTCNNDetector
from inference.faces.mtcnn.networks import PIXEL_MEAN, PIXEL_SCALE
from inference.faces.mtcnn.pyramid import _area_edges, _Level, _plan_pyramid, _pyramid_canvas


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector.load()


def _area_weights(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) float64: how much of source pixel i lies in output pixel o's footprint (TF's edges)."""
    edges = _area_edges(in_size, out_size).astype(np.float64)
    lo, hi = edges[:-1, None], edges[1:, None]
    pixel = np.arange(in_size, dtype=np.float64)[None, :]
    weights: np.ndarray = np.clip(np.minimum(hi, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    return weights


def _reference_level(image: np.ndarray, level: _Level) -> np.ndarray:
    """(3, h, w): the level as an area resize computed by dense weights in float64, normalised."""
    height, width = image.shape[:2]
    wy, wx = _area_weights(height, level.height), _area_weights(width, level.width)
    sums = np.stack([wy @ image[:, :, c].astype(np.float64) @ wx.T for c in range(3)])
    return (sums * level.density - PIXEL_MEAN) / PIXEL_SCALE


@pytest.mark.parametrize("floor", [20.0, 40.0])
def test_canvas_levels_are_exact_area_averages(detector: MTCNNDetector, floor: float) -> None:
    image = np.ascontiguousarray(photos.grace_hopper()[3:, 1:])  # odd sizes
    height, width = image.shape[:2]
    plan = _plan_pyramid(height, width, MTCNNConfig(pyramid_floor=floor), torch.device("cpu"))
    assert plan is not None
    with torch.inference_mode():
        canvas = _pyramid_canvas(detector.prepare(image), plan)[0].double().numpy()
    for level in plan.levels:
        got = canvas[:, level.top : level.top + level.height, level.left : level.left + level.width]
        np.testing.assert_allclose(got, _reference_level(image, level), rtol=0, atol=2e-6)


def test_prepare_gives_contiguous_float_pixels_from_any_layout(detector: MTCNNDetector) -> None:
    image = photos.astronaut()
    expected = torch.from_numpy(image).permute(2, 0, 1).float()
    chw = torch.from_numpy(image).permute(2, 0, 1)
    for given in (image, chw, chw.clone()):
        with torch.inference_mode():
            pixels = detector.prepare(given)
        assert pixels.dtype == torch.float32 and pixels.is_contiguous()
        assert torch.equal(pixels, expected)
