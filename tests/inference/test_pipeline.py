"""The compound pipeline on real photos, with synthetic generator weights (head seed 1, bg seed 2)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from devkit.upstream import UpstreamFlow
from inference.align import CROP_REFERENCE_POINTS, CROP_SIZE, AlignmentError, Box
from inference.backends import Runner
from inference.constants import STAGES
from inference.errors import OptionsError
from inference.geometry import box_area, processing_shape, to_rgb_array, upstream_pad16
from inference.pipeline import (
    AbandonedError,
    Cartoonizer,
    NoFaceError,
    Options,
    PipelineError,
    Result,
    _rgb_hwc_uint8_host,
    _Work,
    mask_support,
)


def _check_face_geometry(face_box: tuple[float, ...], landmarks: tuple[tuple[float, float], ...]) -> None:
    x1, y1, x2, y2 = face_box
    pts = np.asarray(landmarks)
    assert pts.shape == (5, 2)
    assert ((pts[:, 0] > x1) & (pts[:, 0] < x2) & (pts[:, 1] > y1) & (pts[:, 1] < y2)).all()
    left_eye, right_eye, nose, mouth_l, mouth_r = pts
    assert left_eye[0] < right_eye[0] and mouth_l[0] < mouth_r[0]
    eyes_y, mouth_y = (left_eye[1] + right_eye[1]) / 2, (mouth_l[1] + mouth_r[1]) / 2
    assert eyes_y < nose[1] < mouth_y


@pytest.mark.parametrize("photo", [photos.astronaut, photos.grace_hopper])
def test_one_real_face(cartoonizer: Cartoonizer, photo: object) -> None:
    rgb = photo()  # type: ignore[operator]
    result = cartoonizer.run(rgb)
    assert len(result.faces) == 1
    face = result.faces[0]
    assert face.stylized and face.reason is None and face.score > 0.9
    _check_face_geometry(face.box, face.landmarks)
    assert result.image.shape == rgb.shape and result.image.dtype == np.uint8
    assert set(result.timings_ms) == set(STAGES)
    assert all(v >= 0 for v in result.timings_ms.values()) and result.timings_ms["head"] > 0
    assert result.no_face is None and result.style == "anime"
    assert (result.device, result.dtype) == ("cpu", "float32")


class _CountingRunner:
    """Wraps a generator runner and records the batch size of every call."""

    def __init__(self, inner: Runner) -> None:
        self.inner = inner
        self.batches: list[int] = []
        self.device, self.dtype, self.backend = inner.device, inner.dtype, inner.backend

    def __call__(self, bgr: torch.Tensor) -> torch.Tensor:
        self.batches.append(int(bgr.shape[0]))
        return self.inner(bgr)


@pytest.mark.slow
def test_group_photo_all_faces_in_one_head_batch(cartoonizer: Cartoonizer) -> None:
    counting = _CountingRunner(cartoonizer.style.head)
    c = Cartoonizer(replace(cartoonizer.style, head=counting), cartoonizer.detector)
    rgb = photos.group(4)
    result = c.run(rgb)
    assert len(result.faces) == 4 and result.faces_stylized == 4
    assert counting.batches == [4]
    for face in result.faces:
        _check_face_geometry(face.box, face.landmarks)
    # Each face sits in its own tile of the composite.
    tile = 384
    tiles = {
        (int(f.box[1] + f.box[3]) // 2 // tile, int(f.box[0] + f.box[2]) // 2 // tile) for f in result.faces
    }
    assert tiles == {(0, 0), (0, 1), (0, 2), (1, 0)}


def test_no_face_policies(cartoonizer: Cartoonizer) -> None:
    rgb = photos.coffee()
    bg = cartoonizer.run(rgb)
    assert bg.faces == [] and bg.no_face == "background"
    assert bg.image.shape == rgb.shape
    assert np.abs(bg.image.astype(int) - rgb.astype(int)).mean() > 10  # the background network ran
    passthrough = cartoonizer.run(rgb, Options(no_face="passthrough"))
    assert passthrough.no_face == "passthrough"
    np.testing.assert_array_equal(passthrough.image, rgb)
    assert passthrough.timings_ms["background"] == 0.0  # skipped: not needed
    with pytest.raises(NoFaceError, match="no face found"):
        cartoonizer.run(rgb, Options(no_face="error"))


@pytest.mark.slow
def test_skipped_faces_are_reported(cartoonizer: Cartoonizer) -> None:
    rgb = photos.group(4)
    small = cartoonizer.run(rgb, Options(min_face_size=1000, no_face="passthrough"))
    assert [f.reason for f in small.faces] == ["too_small"] * 4
    assert small.no_face == "passthrough" and not any(f.stylized for f in small.faces)
    limited = cartoonizer.run(rgb, Options(max_faces=2))
    reasons = sorted(str(f.reason) for f in limited.faces)
    assert reasons == ["None", "None", "over_limit", "over_limit"]
    # The two kept are the largest.
    area = [box_area(f.box) for f in limited.faces]
    kept = [a for a, f in zip(area, limited.faces, strict=True) if f.stylized]
    assert min(kept) >= max(a for a, f in zip(area, limited.faces, strict=True) if not f.stylized)
    with pytest.raises(NoFaceError, match="1 face\\(s\\) found but none stylisable"):
        cartoonizer.run(photos.astronaut(), Options(min_face_score=0.99999999, no_face="error"))


@pytest.mark.slow
def test_tiny_face_is_skipped_not_silently_dropped(cartoonizer: Cartoonizer) -> None:
    """A real face shrunk to about 20 px on a big canvas: found, and reported as too small."""
    face = np.asarray(Image.fromarray(photos.astronaut()).resize((120, 120), Image.Resampling.BILINEAR))
    canvas = np.full((720, 720, 3), 200, dtype=np.uint8)
    canvas[300:420, 300:420] = face
    result = cartoonizer.run(canvas, Options(min_face_size=60))
    assert len(result.faces) == 1
    assert result.faces[0].reason == "too_small" and not result.faces[0].stylized
    assert result.no_face == "background"


@pytest.mark.slow
def test_head_region_comes_from_the_head_network(cartoonizer: Cartoonizer) -> None:
    rgb = photos.astronaut()
    with_head = cartoonizer.run(rgb)
    bg_only = cartoonizer.run(rgb, Options(max_faces=0))
    assert bg_only.faces[0].reason == "over_limit"
    # Outside the face footprint the result is exactly the background network's.
    x1, y1, x2, y2 = with_head.faces[0].box
    pad = 150
    outside = np.ones(rgb.shape[:2], bool)
    outside[max(0, int(y1) - pad) : int(y2) + pad, max(0, int(x1) - pad) : int(x2) + pad] = False
    np.testing.assert_array_equal(with_head.image[outside], bg_only.image[outside])
    # At the nose (mask = 1) it is the head network's output for the aligned crop, not the background.
    job = _Work(to_rgb_array(rgb), Options())
    with torch.inference_mode():
        cartoonizer.resize(job)
        cartoonizer.detect(job)
        cartoonizer.align(job)
        cartoonizer.head([job])
    assert job.heads is not None
    cx, cy = CROP_REFERENCE_POINTS[2]
    head_nose = job.heads[0, :, int(cy) - 3 : int(cy) + 4, int(cx) - 3 : int(cx) + 4].float().mean((1, 2))
    head_nose_rgb = head_nose.flip(0).numpy()
    nx, ny = (int(v) for v in with_head.faces[0].landmarks[2])
    ours = with_head.image[ny - 3 : ny + 4, nx - 3 : nx + 4].reshape(-1, 3).mean(0)
    bg = bg_only.image[ny - 3 : ny + 4, nx - 3 : nx + 4].reshape(-1, 3).mean(0)
    assert np.abs(ours - head_nose_rgb).max() < 6
    assert np.abs(bg - head_nose_rgb).max() > 3 * np.abs(ours - head_nose_rgb).max()
    assert cartoonizer.style.mask[CROP_SIZE // 2, CROP_SIZE // 2] > 0.99


@pytest.mark.parametrize(("h", "w"), [(333, 517), (517, 333), (801, 601)])
def test_output_size_equals_input_size(cartoonizer: Cartoonizer, h: int, w: int) -> None:
    rgb = np.asarray(Image.fromarray(photos.astronaut()).resize((w, h), Image.Resampling.BILINEAR))
    result = cartoonizer.run(rgb, Options(processing_size=256))
    assert result.image.shape == (h, w, 3)
    assert min(result.processing_size) == 256
    assert result.faces_stylized == 1


def test_output_size_option(cartoonizer: Cartoonizer) -> None:
    result = cartoonizer.run(photos.coffee(), Options(output_size=(123, 77)))
    assert result.image.shape == (123, 77, 3) and result.output_size == (123, 77)


@pytest.mark.slow
def test_strength(cartoonizer: Cartoonizer) -> None:
    rgb = photos.astronaut()
    photo = cartoonizer.run(rgb, Options(strength=0.0))
    np.testing.assert_array_equal(photo.image, rgb)
    full = cartoonizer.run(rgb)
    half = cartoonizer.run(rgb, Options(strength=0.5))
    expected = (rgb.astype(np.float32) + full.image.astype(np.float32)) / 2
    assert np.abs(half.image.astype(np.float32) - expected).max() <= 1.0


@pytest.mark.slow
def test_grey_and_rgba_inputs(cartoonizer: Cartoonizer) -> None:
    grey = np.asarray(Image.fromarray(photos.astronaut()).convert("L"))
    out = cartoonizer.run(grey)
    assert out.image.shape == (*grey.shape, 3) and out.faces_stylized == 1
    rgba = np.dstack([photos.astronaut(), np.full((512, 512), 255, np.uint8)])
    rgba[:100, :100, 3] = 0  # transparent corner → white
    assert cartoonizer.run(rgba).faces_stylized == 1
    np.testing.assert_array_equal(to_rgb_array(rgba)[:100, :100], 255)


def test_processing_geometry() -> None:
    assert processing_shape(768, 1024, 720) == (720, 960)
    assert processing_shape(1024, 768, 720) == (960, 720)
    assert processing_shape(500, 700, 720) == (500, 700)
    assert processing_shape(1000, 1333, 720) == (720, 959)  # truncated, as upstream
    assert upstream_pad16(720, 960) == (720, 960)
    assert upstream_pad16(720, 959) == (736, 960)  # both sides grow, as upstream's padTo16x


@pytest.mark.parametrize(
    "kwargs",
    [
        {"processing_size": 32},
        {"processing_size": 4096},
        {"strength": 1.5},
        {"strength": float("nan")},
        {"no_face": "explode"},
        {"max_faces": -1},
        {"output_size": (0, 10)},
    ],
)
def test_options_are_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(OptionsError):
        Options(**kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def upstream_flow(head_pb: bytes, bg_pb: bytes, model_dir: ReferenceModelDir) -> Iterator[UpstreamFlow]:
    """The TF graphs with the weights of ``model_dir``'s (which TensorFlow cannot run), and its mask."""
    pytest.importorskip("cv2")
    flow = UpstreamFlow(head_pb, bg_pb, model_dir.path / "alpha.jpg")
    yield flow
    flow.close()


@pytest.mark.tf
@pytest.mark.parametrize("photo", [photos.astronaut, lambda: photos.group(4)])
def test_matches_upstream_flow(cartoonizer: Cartoonizer, upstream_flow: UpstreamFlow, photo: Any) -> None:
    """Our pipeline against ModelScope's flow (its own alignment code, cv2, the TF graphs), same faces.

    The remaining differences are the resize and warp filters (cv2's 1/32-pixel fixed point vs exact
    float sampling) and our rounding of the blend; colour order, padding, alignment, mask, blend
    order and the head/background assignment must all agree.
    """
    rgb = photo()
    ours = cartoonizer.run(rgb)
    proc_h, proc_w = ours.processing_size
    sy, sx = proc_h / rgb.shape[0], proc_w / rgb.shape[1]
    stylized = sorted(
        (f for f in ours.faces if f.stylized),
        key=lambda f: (f.box[2] - f.box[0]) * (f.box[3] - f.box[1]),
        reverse=True,
    )
    points = [np.asarray(f.landmarks) * [sx, sy] for f in stylized]
    ref = upstream_flow.run(rgb, points)
    diff = np.abs(ours.image.astype(np.float32) - np.clip(ref, 0, 255))
    assert float(diff.mean()) < 1.0, f"mean {diff.mean():.3f}"
    assert float(np.percentile(diff, 99)) <= 6, f"p99 {np.percentile(diff, 99):.1f}"


@pytest.mark.tf
def test_resizes_are_upstreams_where_it_matters(
    cartoonizer: Cartoonizer, upstream_flow: UpstreamFlow
) -> None:
    """A photo over the processing size, shrunk to it and the result brought back: with OpenCV's area
    filter to shrink, as upstream, the processing image is upstream's, and what is left of the
    difference is the enlarging filter and the warps (Pillow's box filter here left a mean of 0.44,
    a 99th percentile of 3.3 and a largest difference of 13 levels)."""
    rgb = photos.one_face_1024x768()
    ours = cartoonizer.run(rgb)
    assert ours.processing_size == (720, 960)
    faces = [np.asarray(f.landmarks) * (720 / 768) for f in ours.faces if f.stylized]  # one face
    diff = np.abs(ours.image.astype(np.float32) - np.clip(upstream_flow.run(rgb, faces), 0, 255))
    assert float(diff.mean()) < 0.3, f"mean {diff.mean():.3f}"
    assert float(np.percentile(diff, 99)) <= 1.5, f"p99 {np.percentile(diff, 99):.1f}"


@pytest.mark.slow
def test_run_many_batches_across_images(cartoonizer: Cartoonizer) -> None:
    head = _CountingRunner(cartoonizer.style.head)
    bg = _CountingRunner(cartoonizer.style.bg)
    c = Cartoonizer(replace(cartoonizer.style, head=head, bg=bg), cartoonizer.detector, bg_batch=4)
    astro, group = photos.astronaut(), photos.group(4)
    items = [
        (astro, Options()),
        (group, Options()),
        (astro[:, ::-1].copy(), Options()),
        (photos.coffee(), Options(no_face="error")),
    ]
    outcomes = c.run_many(items)
    assert head.batches == [6]  # 1 + 4 + 1 faces in one head call
    assert sorted(bg.batches) == [1, 2]  # the two astronauts share a background call; coffee needs none
    assert isinstance(outcomes[3], NoFaceError)
    for (image, options), outcome in zip(items[:3], outcomes[:3], strict=True):
        assert not isinstance(outcome, Exception)
        alone = cartoonizer.run(image, options)
        assert np.abs(outcome.image.astype(int) - alone.image.astype(int)).max() <= 1


def test_run_many_drops_cancelled_images(cartoonizer: Cartoonizer) -> None:
    items = [(photos.astronaut(), Options()), (photos.grace_hopper(), Options())]
    outcomes = cartoonizer.run_many(items, alive=lambda i: i == 0)
    assert not isinstance(outcomes[0], Exception) and outcomes[0].faces_stylized == 1
    assert isinstance(outcomes[1], AbandonedError)


@pytest.mark.slow
def test_background_batch_limit(cartoonizer: Cartoonizer) -> None:
    bg = _CountingRunner(cartoonizer.style.bg)
    c = Cartoonizer(replace(cartoonizer.style, bg=bg), cartoonizer.detector, bg_batch=1)
    astro = photos.astronaut()
    c.run_many([(astro, Options()), (astro, Options())])
    assert bg.batches == [1, 1]
    with pytest.raises(OptionsError):
        Cartoonizer(cartoonizer.style, cartoonizer.detector, head_batch=0)


@pytest.mark.slow
def test_a_stage_failure_fails_that_image_alone(
    cartoonizer: Cartoonizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected failure in the align stage of one image of a batch: it gets a PipelineError,
    its neighbours finish as if it had not been there."""
    astro, hopper = photos.astronaut(), photos.grace_hopper()
    bad = astro[:, ::-1].copy()
    real_align = Cartoonizer.align

    def align(self: Cartoonizer, job: Any) -> None:
        if job.rgb.shape == bad.shape and np.array_equal(job.rgb, bad):
            raise RuntimeError("injected")
        real_align(self, job)

    monkeypatch.setattr(Cartoonizer, "align", align)
    outcomes = cartoonizer.run_many([(astro, Options()), (bad, Options()), (hopper, Options())])
    assert isinstance(outcomes[1], PipelineError) and "align stage" in str(outcomes[1])
    for image, outcome in ((astro, outcomes[0]), (hopper, outcomes[2])):
        assert isinstance(outcome, Result) and outcome.faces_stylized == 1
        monkeypatch.setattr(Cartoonizer, "align", real_align)
        alone = cartoonizer.run(image)
        assert np.array_equal(outcome.image, alone.image)


@pytest.mark.slow
def test_a_batched_stage_failure_is_narrowed_to_its_image(cartoonizer: Cartoonizer) -> None:
    """The head network raises for a batch holding one poisoned crop: the call is retried image by
    image, so only the image it belongs to fails."""
    head = cartoonizer.style.head

    def picky(bgr: torch.Tensor) -> torch.Tensor:
        if bool((bgr[:, :, 0, 0] == 7).all(dim=1).any()):
            raise RuntimeError("device fault")
        return head(bgr)

    c = Cartoonizer(replace(cartoonizer.style, head=picky), cartoonizer.detector)  # type: ignore[arg-type]
    poisoned_align = c.align

    def align(job: Any) -> None:
        poisoned_align(job)
        if job.options.strength == 0.5 and job.crops is not None:
            job.crops[:, :, 0, 0] = 7

    c.align = align  # type: ignore[method-assign,assignment]
    outcomes = c.run_many([(photos.astronaut(), Options()), (photos.grace_hopper(), Options(strength=0.5))])
    assert isinstance(outcomes[0], Result) and outcomes[0].faces_stylized == 1
    assert isinstance(outcomes[1], PipelineError) and "head stage" in str(outcomes[1])


def test_unalignable_face_is_skipped_with_its_reason(
    cartoonizer: Cartoonizer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import inference.pipeline as pipeline

    def degenerate(points: Any) -> Any:
        raise AlignmentError("The landmark points all coincide; a face needs distinct landmarks.")

    monkeypatch.setattr(pipeline, "crop_matrices", degenerate)
    result = cartoonizer.run(photos.astronaut())
    assert [f.reason for f in result.faces] == ["alignment_failed"]
    assert result.faces_stylized == 0 and result.no_face == "background"


def test_the_mask_support_bounds_its_non_zero_values() -> None:
    mask = torch.zeros(288, 288)
    assert mask_support(mask).is_empty
    mask[10, 30] = 0.5
    mask[200, 7] = 1.0
    assert mask_support(mask) == Box(top=10, left=7, bottom=201, right=31)
    assert mask_support(torch.ones(288, 288)) == Box(0, 0, 288, 288)


def test_the_cartoon_is_rounded_the_same_way_on_the_host_whatever_its_layout() -> None:
    rng = np.random.default_rng(5)
    values = rng.uniform(-0.49, 255.49, (37, 53, 3)).astype(np.float32)
    values[0, :8, 0] = [0.5, 1.5, 2.5, 254.5, 255.5, -0.25, -0.0, 300.0]  # ties go to even; clamped
    channels_last = torch.from_numpy(values.copy()).permute(2, 0, 1)  # the background pass's layout
    padded = torch.from_numpy(np.pad(values, ((0, 3), (0, 5), (0, 0)))).permute(2, 0, 1)[:, :37, :53]
    planar = channels_last.contiguous()  # (3, h, w) planes: the torch way
    expected = channels_last.flip(0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0)
    for bgr in (channels_last, padded, planar):
        got = _rgb_hwc_uint8_host(bgr.clone() if bgr is planar else bgr)
        assert got.is_contiguous() and got.dtype == torch.uint8
        assert torch.equal(got, expected)
