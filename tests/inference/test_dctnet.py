"""The PyTorch generator against the TensorFlow frozen graph it was converted from (dctnet.md §2.3)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from devkit import photos
from devkit.reference_graphs import TFGenerator, build_generator_pb
from inference.convert import convert_pb
from inference.dctnet import (
    CONV_SPECS,
    PARAMETER_COUNT,
    DCTNetGenerator,
    GeneratorRunner,
    check_size,
    load_generator,
    onednn_usable,
    pad_to_multiple,
    upsample2x_tf_legacy,
)
from inference.errors import InputShapeError
from inference.weights import StyleWeights

BACKENDS = ["eager"] + (["onednn"] if onednn_usable(torch.device("cpu"), torch.float32) else [])


def photo_bgr(h: int, w: int, source: str = "hopper") -> np.ndarray:
    """A real photo resized to h×w, HWC uint8 BGR (the generator's colour order)."""
    rgb = photos.grace_hopper() if source == "hopper" else photos.astronaut()
    return np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))[:, :, ::-1].copy()


def to_nchw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(hwc)).permute(2, 0, 1)[None]


def to_hwc(nchw: torch.Tensor) -> np.ndarray:
    out: np.ndarray = nchw[0].permute(1, 2, 0).numpy()
    return out


def assert_parity(ours: np.ndarray, ref: np.ndarray) -> None:
    """≥ 99.9 % of uint8 values identical to TensorFlow's, none off by more than one level."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    identical = float((diff == 0).mean())
    assert diff.max() <= 1, f"max deviation {diff.max()} levels"
    assert identical >= 0.999, f"only {identical:.5%} identical"


@pytest.fixture(scope="module", params=BACKENDS)
def runner(request: pytest.FixtureRequest, style_weights: StyleWeights) -> GeneratorRunner:
    r = GeneratorRunner(load_generator(style_weights.head), backend=request.param)
    assert r.backend == request.param
    return r


@pytest.mark.tf
@pytest.mark.parametrize(("h", "w"), [(288, 288), (64, 80), (720, 960)])
def test_fp32_matches_tensorflow(runner: GeneratorRunner, tf_head: TFGenerator, h: int, w: int) -> None:
    bgr = photo_bgr(h, w)
    ref = tf_head(bgr)
    ours = to_hwc(runner(to_nchw(bgr)))
    assert_parity(ours, ref)
    # The reference output really varies (the comparison is not between two flat images).
    assert ref.std() > 10


@pytest.mark.tf
def test_odd_size_through_padding(runner: GeneratorRunner, tf_head: TFGenerator) -> None:
    """A 301×437 photo padded with white to a multiple of 16 (as the pipeline does), then cropped."""
    bgr = photo_bgr(301, 437, source="astronaut")
    padded = pad_to_multiple(to_nchw(bgr), 16)
    assert padded.shape[-2:] == (304, 448)
    assert bool((padded[..., 301:, :] == 255).all()) and bool((padded[..., :, 437:] == 255).all())
    ours = to_hwc(runner(padded))[:301, :437]
    ref = tf_head(to_hwc(padded))[:301, :437]
    assert_parity(ours, ref)


def test_output_range_and_dtype(runner: GeneratorRunner) -> None:
    out = runner(to_nchw(photo_bgr(64, 64)))
    assert out.dtype == torch.uint8 and out.shape == (1, 3, 64, 64)
    # The ±0.999999 clip and the truncating cast make 255 impossible.
    assert int(out.max()) <= 254


@pytest.mark.slow
def test_batch_equals_single_calls(runner: GeneratorRunner) -> None:
    crops = [photo_bgr(288, 288, s) for s in ("hopper", "astronaut")]
    crops += [c[:, ::-1].copy() for c in crops]
    batch = torch.cat([to_nchw(c) for c in crops])
    together = runner(batch)
    for i, crop in enumerate(crops):
        alone = runner(to_nchw(crop))
        diff = (together[i : i + 1].int() - alone.int()).abs()
        # Same kernels whatever the batch: identical bytes, not merely close.
        assert int(diff.max()) == 0


def test_backends_agree(style_weights: StyleWeights) -> None:
    if len(BACKENDS) < 2:
        pytest.skip("oneDNN not usable here")
    bgr = to_nchw(photo_bgr(96, 128))
    a = GeneratorRunner(load_generator(style_weights.head), backend="eager").filtered(bgr)
    b = GeneratorRunner(load_generator(style_weights.head), backend="onednn").filtered(bgr)
    assert float((a - b).abs().max()) < 1e-4


def test_bf16_close_to_fp32(style_weights: StyleWeights) -> None:
    """The fast mode: mean deviation from the exact mode well under one level."""
    bgr = to_nchw(photo_bgr(288, 384))
    exact = GeneratorRunner(load_generator(style_weights.head))(bgr)
    fast_runner = GeneratorRunner(load_generator(style_weights.head, dtype=torch.bfloat16))
    assert fast_runner.dtype == torch.bfloat16
    dev = (fast_runner(bgr).float() - exact.float()).abs()
    assert float(dev.mean()) <= 1.0
    assert float(dev.max()) <= 16


def test_parameter_count_and_names(head_model: DCTNetGenerator) -> None:
    names = {n for n, _ in head_model.named_parameters()}
    assert len(names) == 36
    assert sum(p.numel() for p in head_model.parameters()) == PARAMETER_COUNT
    assert {f"{s.module_path}.weight" for s in CONV_SPECS} <= names


def test_size_contract() -> None:
    with pytest.raises(InputShapeError, match="multiples of 4"):
        check_size(torch.zeros(1, 3, 50, 70, dtype=torch.uint8))
    with pytest.raises(InputShapeError, match=r"\(N, 3, H, W\)"):
        check_size(torch.zeros(3, 52, 68, dtype=torch.uint8))
    check_size(torch.zeros(2, 3, 52, 68, dtype=torch.uint8))


def test_upsample_is_tf_legacy_not_half_pixel() -> None:
    x = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    up = upsample2x_tf_legacy(x)
    # out[2k] = in[k]; out[2k+1] = mean of in[k] and in[k+1], the last one replicated.
    assert torch.equal(up[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.0]))
    assert torch.equal(up[0, 0, :, 0], torch.tensor([0.0, 2.0, 4.0, 6.0, 8.0, 8.0]))
    assert not torch.allclose(up, F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))


@pytest.mark.tf
def test_naive_port_fails_parity(
    head_model: DCTNetGenerator, tf_head: TFGenerator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parity check is sharp: PyTorch's half-pixel upsampling instead of TF's legacy rule fails it."""
    import inference.dctnet as dctnet

    def half_pixel_add(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return skip + F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)

    monkeypatch.setattr(dctnet, "upsample2x_tf_legacy_add", half_pixel_add)
    bgr = photo_bgr(128, 128)
    naive = to_hwc(GeneratorRunner(head_model, backend="eager")(to_nchw(bgr)))
    identical = float((naive == tf_head(bgr)).mean())
    assert identical < 0.9


@pytest.mark.tf
def test_eps_is_read_from_the_graph(tmp_path: Path) -> None:
    """White-box's own eps (5e-3) instead of CartoonModel's 1e-2: converted and honoured."""
    pb = build_generator_pb(seed=7, eps=5e-3)
    src = tmp_path / "g.pb"
    src.write_bytes(pb)
    meta = convert_pb(src, tmp_path / "g.safetensors", "sketch", "bg")
    assert float(meta["eps"]) == pytest.approx(5e-3, rel=1e-6)
    model = load_generator(tmp_path / "g.safetensors")
    assert model.eps == pytest.approx(5e-3, rel=1e-6)
    bgr = photo_bgr(64, 96)
    tf = TFGenerator(pb)
    try:
        assert_parity(to_hwc(GeneratorRunner(model)(to_nchw(bgr))), tf(bgr))
    finally:
        tf.close()
