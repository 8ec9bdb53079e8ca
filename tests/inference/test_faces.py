"""Tests of :mod:`inference.faces`: the torch MTCNN against the ``mtcnn`` package's own TensorFlow run,
its behaviour on real photos, its building blocks against TF ops, and the numpy-only weight reader.

The reference (``mtcnn.MTCNN``, TensorFlow) is imported once per module; it is the only place that
package's code runs.
"""

from __future__ import annotations

import pickle
import pickletools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from devkit import photos
from inference import faces
from inference.errors import InputShapeError, ToonserveError
from inference.faces import (
    LANDMARK_NAMES,
    DetectedFace,
    FaceDetector,
    FaceDetectorError,
    MTCNNConfig,
    MTCNNDetector,
    create_detector,
    crop_and_resize,
    nms_keep,
    package_weights_dir,
    pyramid_scales,
    read_numpy_pickle,
)
from inference.faces.detector import _REGISTRY
from inference.faces.mtcnn.pyramid import _plan_pyramid, _pyramid_canvas

#: Measured on CPU: boxes and landmarks agree to within 5e-3 px, scores to 5e-6 (float32 both sides).
#: The bounds leave room for other BLAS/oneDNN builds, and are still far inside the 1-2 px that matter.
BOX_TOLERANCE_PX = 0.05
SCORE_TOLERANCE = 1e-4

PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": photos.astronaut,
    "grace_hopper": photos.grace_hopper,
    "group4": lambda: photos.group(4),
}
#: Further parity cases: a face cut by the image's left edge (crops reach outside the image, the box
#: is clipped), odd sizes at every pyramid level.
EDGE_CASES: dict[str, Callable[[], np.ndarray]] = {
    "face_at_the_edge": lambda: np.ascontiguousarray(photos.astronaut()[40:, 200:]),
    "odd_sizes": lambda: np.ascontiguousarray(photos.grace_hopper()[3:, 1:]),
}

Reference = Callable[..., np.ndarray]
#: MTCNNConfig fields the package spells differently (it ignores unknown keywords silently).
PACKAGE_OPTION_NAMES = {
    "pyramid_floor": "min_face_size",
    "nms_pnet_level": "nms_pnet1",
    "nms_pnet": "nms_pnet2",
}


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector.load()


@pytest.fixture(scope="module")
def tf_mtcnn() -> Any:
    mtcnn = pytest.importorskip("mtcnn", reason="the mtcnn package (TensorFlow) is the parity reference")
    return mtcnn.MTCNN()


@pytest.fixture(scope="module")
def reference(tf_mtcnn: Any) -> Reference:
    """The package's detections as (N, 15) rows laid out like ours: box, score, (x, y) × 5."""

    def run(image: np.ndarray, **options: Any) -> np.ndarray:
        kwargs = {PACKAGE_OPTION_NAMES.get(k, k): v for k, v in options.items()}
        rows = np.asarray(tf_mtcnn.detect_faces(image, output_type="numpy", box_format="xyxy", **kwargs))
        rows = rows.reshape(-1, 16)
        points = np.stack([rows[:, 6:11], rows[:, 11:16]], axis=2).reshape(-1, 10)
        return np.concatenate([rows[:, 1:6], points], axis=1)

    return run


def _as_rows(found: list[DetectedFace]) -> np.ndarray:
    return np.array([[*f.box, f.score, *f.landmarks.reshape(-1)] for f in found]).reshape(-1, 15)


# --- parity with the package ------------------------------------------------------------------------


@pytest.mark.tf
@pytest.mark.parametrize("name", [*PHOTOS, *EDGE_CASES])
def test_matches_the_mtcnn_package(detector: MTCNNDetector, reference: Reference, name: str) -> None:
    image = {**PHOTOS, **EDGE_CASES}[name]()
    expected = reference(image)
    found = _as_rows(detector.detect(image))
    assert len(found) == len(expected) > 0
    for row in found:
        # Pair by box, so near-equal scores listed in another order would not matter.
        match = expected[np.argmin(np.abs(expected[:, :4] - row[:4]).sum(axis=1))]
        np.testing.assert_allclose(row[:4], match[:4], atol=BOX_TOLERANCE_PX)
        np.testing.assert_allclose(row[5:], match[5:], atol=BOX_TOLERANCE_PX)
        assert abs(row[4] - match[4]) < SCORE_TOLERANCE


@pytest.mark.tf
@pytest.mark.parametrize(
    ("image", "options"),
    [
        (lambda: photos.group(4), {"pyramid_floor": 15, "scale_factor": 0.6, "threshold_pnet": 0.7}),
        (lambda: photos.group(4), {"threshold_onet": 0.99, "nms_pnet_level": 0.3, "nms_pnet": 0.5}),
        # pyramid_floor below the P-Net window: the pyramid starts above scale 1 (upsampling).
        (lambda: np.ascontiguousarray(photos.astronaut()[::4, ::4]), {"pyramid_floor": 8}),
    ],
)
def test_matches_the_package_with_other_parameters(
    detector: MTCNNDetector,
    reference: Reference,
    image: Callable[[], np.ndarray],
    options: dict[str, float],
) -> None:
    pixels = image()
    expected = reference(pixels, **options)
    found = _as_rows(detector.with_config(**options).detect(pixels))
    assert found.shape == expected.shape and len(found) > 0
    np.testing.assert_allclose(found[:, :4], expected[:, :4], atol=BOX_TOLERANCE_PX)
    np.testing.assert_allclose(found[:, 4], expected[:, 4], atol=SCORE_TOLERANCE)
    np.testing.assert_allclose(found[:, 5:], expected[:, 5:], atol=BOX_TOLERANCE_PX)


@pytest.mark.tf
def test_keras_layout_conversion(detector: MTCNNDetector, tf_mtcnn: Any) -> None:
    """Each converted network computes what its Keras original computes (flatten order included)."""
    stages = {stage.name: stage.model for stage in tf_mtcnn.stages}
    rng = np.random.default_rng(0)
    cases = [("Stage PNET", detector.pnet, (2, 31, 45)), ("Stage RNET", detector.rnet, (5, 24, 24))]
    cases.append(("Stage ONET", detector.onet, (5, 48, 48)))
    for name, net, (n, h, w) in cases:
        x = rng.uniform(-1, 1, (n, h, w, 3)).astype(np.float32)
        expected = [np.asarray(y) for y in stages[name](x)]
        with torch.inference_mode():
            got = net(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last))
        for e, g in zip(expected, got, strict=True):
            g = g.permute(0, 2, 3, 1) if g.dim() == 4 else g
            if e.shape[-1] == 2:  # Keras ends with a softmax; ours returns logits
                g = torch.softmax(g, -1)
            np.testing.assert_allclose(g.numpy(), e, atol=1e-5)


# --- behaviour on real photos -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["astronaut", "grace_hopper"])
def test_one_portrait_one_face(detector: MTCNNDetector, name: str) -> None:
    (face,) = detector.detect(PHOTOS[name]())
    x1, y1, x2, y2 = face.box
    assert face.score > 0.95
    assert face.landmarks.shape == (5, 2) and face.landmarks.dtype == np.float32
    marks = dict(zip(LANDMARK_NAMES, face.landmarks, strict=True))
    for x, y in face.landmarks:
        assert x1 < x < x2 and y1 < y < y2
    mouth_y = min(marks["mouth_left"][1], marks["mouth_right"][1])
    assert max(marks["left_eye"][1], marks["right_eye"][1]) < marks["nose"][1] < mouth_y
    assert marks["left_eye"][0] < marks["nose"][0] < marks["right_eye"][0]
    assert marks["mouth_left"][0] < marks["mouth_right"][0]


def test_group_photo_four_faces(detector: MTCNNDetector) -> None:
    image = photos.group(4)
    found = detector.detect(image)
    assert len(found) == 4
    assert [f.score for f in found] == sorted((f.score for f in found), reverse=True)
    tile = image.shape[1] // 3
    tiles = {(int(f.landmarks[2, 1]) // tile, int(f.landmarks[2, 0]) // tile) for f in found}
    assert tiles == {(0, 0), (0, 1), (0, 2), (1, 0)}
    h, w = image.shape[:2]
    for f in found:  # mirrored tiles too: "left" is image-left
        assert f.landmarks[0, 0] < f.landmarks[1, 0]
        assert f.landmarks[3, 0] < f.landmarks[4, 0]
        assert 0 <= f.box[0] < f.box[2] <= w - 1 and 0 <= f.box[1] < f.box[3] <= h - 1


def test_no_face_in_coffee(detector: MTCNNDetector) -> None:
    assert detector.detect(photos.coffee()) == []


def test_tiny_image_has_no_face(detector: MTCNNDetector) -> None:
    assert detector.detect(np.zeros((10, 10, 3), np.uint8)) == []


def test_tensor_and_array_inputs_agree(detector: MTCNNDetector) -> None:
    image = photos.astronaut()
    from_array = _as_rows(detector.detect(image))
    from_tensor = _as_rows(detector.detect(torch.from_numpy(image).permute(2, 0, 1).contiguous()))
    np.testing.assert_array_equal(from_array, from_tensor)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((64, 64), np.uint8),
        np.zeros((64, 64, 3), np.float32),
        torch.zeros(64, 64, 3, dtype=torch.uint8),
    ],
)
def test_bad_input_is_refused(detector: MTCNNDetector, bad: Any) -> None:
    with pytest.raises(InputShapeError):
        detector.detect(bad)


# --- parameters -------------------------------------------------------------------------------------


@pytest.mark.tf
def test_pyramid_floor_is_not_a_filter(detector: MTCNNDetector, reference: Reference) -> None:
    """``pyramid_floor`` sets the first pyramid scale (12 / pyramid_floor), as the package's
    ``min_face_size`` does; it is not a filter. A face half that size can still be found (P-Net's
    12-pixel window and box regression reach it; the package finds it too), one a quarter of it is not."""
    image = np.asarray(Image.fromarray(photos.astronaut()).resize((64, 64), Image.Resampling.BILINEAR))
    (face,) = detector.detect(image)
    assert face.box[2] - face.box[0] < 12  # about 10 × 14 px, against pyramid_floor 20
    assert len(reference(image)) == 1
    assert detector.with_config(pyramid_floor=40).detect(image) == []
    assert pyramid_scales(64, 64, 40, 0.709)[0] == pytest.approx(0.3)


@pytest.mark.tf
def test_large_pyramid_floor_skips_levels_the_package_cannot_run(
    detector: MTCNNDetector, reference: Reference
) -> None:
    """With pyramid_floor 60 on a 512² photo the package's last pyramid levels are smaller than
    P-Net's window; TF then fails inside the package, which returns no face. We skip those levels."""
    image = photos.astronaut()
    assert len(reference(image, pyramid_floor=60)) == 0
    assert len(detector.with_config(pyramid_floor=60).detect(image)) == 1
    assert detector.with_config(pyramid_floor=150).detect(image) == []  # face ~85 px


def test_thresholds_are_honoured(detector: MTCNNDetector) -> None:
    image = photos.group(4)
    scores = sorted(f.score for f in detector.detect(image))
    cut = (scores[0] + scores[1]) / 2
    kept = detector.with_config(threshold_onet=cut).detect(image)
    assert len(kept) == 3 and all(f.score > cut for f in kept)
    assert detector.with_config(threshold_rnet=0.999999).detect(image) == []
    assert len(detector.with_config(max_candidates=1).detect(image)) <= 1


@pytest.mark.parametrize(
    "options",
    [
        {"pyramid_floor": 0},
        {"scale_factor": 1.0},
        {"threshold_rnet": 1.5},
        {"nms_onet": -0.1},
        {"max_candidates": 0},
    ],
)
def test_bad_parameters_are_refused(options: dict[str, Any]) -> None:
    with pytest.raises(FaceDetectorError):
        MTCNNConfig(**options)


# --- the interface and the factory ------------------------------------------------------------------


def test_create_detector() -> None:
    made = create_detector("mtcnn", "cpu", pyramid_floor=30)
    assert isinstance(made, FaceDetector) and isinstance(made, MTCNNDetector)
    assert made.config.pyramid_floor == 30 and made.device == torch.device("cpu")
    assert "mtcnn" in faces.available_detectors()
    with pytest.raises(FaceDetectorError, match="unknown face detector"):
        create_detector("retinaface")
    with pytest.raises(FaceDetectorError, match="unknown MTCNN option"):
        create_detector("mtcnn", "cpu", min_size=3)
    with pytest.raises(FaceDetectorError, match="bad MTCNN option"):
        create_detector("mtcnn", "cpu", pyramid_floor="big")
    assert issubclass(FaceDetectorError, ToonserveError)


def test_another_detector_can_be_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    class Fixed:
        device = torch.device("cpu")

        def detect(self, image: torch.Tensor | np.ndarray) -> list[DetectedFace]:
            return [DetectedFace((0.0, 0.0, 1.0, 1.0), 1.0, np.zeros((5, 2), np.float32))]

    given: list[dict[str, object]] = []

    def make(device: object, dtype: object, **options: object) -> Fixed:
        given.append(options)
        return Fixed()

    monkeypatch.setitem(_REGISTRY, "fixed", make)
    made = create_detector("fixed")
    assert isinstance(made, FaceDetector)
    assert made.detect(np.zeros((1, 1, 3), np.uint8))[0].score == 1.0
    create_detector("fixed", smallest_face=40.0)
    assert given == [{}, {"smallest_face": 40.0}]


def test_the_smallest_face_sets_the_mtcnn_pyramid_floor() -> None:
    assert create_detector("mtcnn", smallest_face=40.0).config.pyramid_floor == 40.0  # type: ignore[attr-defined]
    assert create_detector("mtcnn", smallest_face=0.0).config.pyramid_floor == 12.0  # type: ignore[attr-defined]
    explicit = create_detector("mtcnn", smallest_face=40.0, pyramid_floor=20.0)
    assert explicit.config.pyramid_floor == 20.0  # type: ignore[attr-defined]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_finds_the_same_face(detector: MTCNNDetector, dtype: torch.dtype) -> None:
    image = photos.astronaut()
    (expected,) = detector.detect(image)
    (found,) = MTCNNDetector(detector.pnet, detector.rnet, detector.onet, dtype=dtype).detect(image)
    np.testing.assert_allclose(found.box, expected.box, atol=8)
    np.testing.assert_allclose(found.landmarks, expected.landmarks, atol=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(detector: MTCNNDetector) -> None:
    image = photos.group(4)
    on_gpu = MTCNNDetector(detector.pnet, detector.rnet, detector.onet, device="cuda")
    found = on_gpu.detect(torch.from_numpy(image).permute(2, 0, 1).cuda())
    expected = _as_rows(detector.detect(image))
    assert _as_rows(found).shape == expected.shape
    # TF32 convolutions (torch's CUDA default) move things by a fraction of a pixel.
    np.testing.assert_allclose(np.sort(_as_rows(found), 0), np.sort(expected, 0), atol=1.0)


# --- building blocks against TensorFlow and by construction ----------------------------------------


@pytest.mark.tf
def test_packed_pyramid_matches_tf_area_resize(detector: MTCNNDetector) -> None:
    tf = pytest.importorskip("tensorflow")
    image = photos.grace_hopper()
    height, width = image.shape[:2]
    plan = _plan_pyramid(height, width, MTCNNConfig(), torch.device("cpu"))
    assert plan is not None
    with torch.inference_mode():
        canvas = _pyramid_canvas(detector.prepare(image), plan)[0].permute(1, 2, 0).numpy()
    normalised = (image.astype(np.float64) - 127.5) / 128
    for level in plan.levels:
        expected = tf.image.resize(normalised, (level.height, level.width), method="area").numpy()
        got = canvas[level.top : level.top + level.height, level.left : level.left + level.width]
        np.testing.assert_allclose(got, expected, atol=1e-4)  # TF sums in float32 (~4e-5 off)


def test_packed_pnet_equals_one_pass_per_level(detector: MTCNNDetector) -> None:
    """The -inf overhang makes each level's cells on the packed canvas equal a separate pass."""
    image = photos.coffee()
    height, width = image.shape[:2]
    plan = _plan_pyramid(height, width, MTCNNConfig(), torch.device("cpu"))
    assert plan is not None and any(lv.pool_overhang() for lv in plan.levels)
    with torch.inference_mode():
        canvas = _pyramid_canvas(detector.prepare(image), plan)
        reg, logits = detector.pnet(canvas.contiguous(memory_format=torch.channels_last), plan.outside)
        for level in plan.levels:
            alone = canvas[:, :, level.top : level.top + level.height, level.left : level.left + level.width]
            reg_alone, logits_alone = detector.pnet(alone.contiguous(memory_format=torch.channels_last))
            rows, cols = level.cells
            at = (
                slice(None),
                slice(None),
                slice(level.top // 2, level.top // 2 + rows),
                slice(level.left // 2, level.left // 2 + cols),
            )
            torch.testing.assert_close(reg[at], reg_alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(logits[at], logits_alone, atol=1e-5, rtol=0)


@pytest.mark.tf
def test_crop_and_resize_matches_tf() -> None:
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(1)
    image = rng.uniform(-1, 1, (37, 53, 3)).astype(np.float32)
    boxes = np.array([[3.2, 4.7, 20.1, 22.9], [-6.0, -3.5, 12.0, 14.5], [40.0, 30.0, 70.0, 60.0]], np.float32)
    h, w = image.shape[:2]
    norm = boxes[:, [1, 0, 3, 2]] / np.array([h, w, h, w], np.float32)
    expected = tf.image.crop_and_resize(image[None], norm, np.zeros(3, np.int32), (24, 24)).numpy()
    got = crop_and_resize(torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(boxes), 24)
    np.testing.assert_allclose(got.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)


def test_nms_is_the_packages_not_greedy() -> None:
    # b overlaps a; c overlaps b but not a. Greedy NMS keeps c (b is gone); the package drops it.
    boxes = torch.tensor([[0.0, 0, 10, 10], [3, 0, 13, 10], [7, 0, 17, 10], [50, 50, 60, 60]])
    assert nms_keep(boxes, 0.3).tolist() == [True, False, False, True]
    assert nms_keep(boxes, 0.3, groups=torch.tensor([0, 1, 1, 0])).tolist() == [True, True, False, True]
    # "min": the overlap over the smaller box; a box inside another is suppressed by it.
    nested = torch.tensor([[0.0, 0, 20, 20], [5, 5, 10, 10]])
    assert nms_keep(nested, 0.7, "union").tolist() == [True, True]
    assert nms_keep(nested, 0.7, "min").tolist() == [True, False]


# --- the weight files: numpy data only --------------------------------------------------------------


def test_weights_found_through_package_metadata() -> None:
    folder = package_weights_dir()
    assert {p.name for p in folder.glob("*.lz4")} >= {"pnet.lz4", "rnet.lz4", "onet.lz4"}
    arrays = read_numpy_pickle(folder / "rnet.lz4")
    assert [a.shape for a in arrays[:3]] == [(3, 3, 3, 28), (28,), (1, 1, 28)]
    assert all(a.dtype == np.float32 for a in arrays)


def _lz4(payload: bytes) -> bytes:
    import lz4.frame

    compressed: bytes = lz4.frame.compress(payload)
    return compressed


class _Shell:
    """Pickles as a call of ``os.system`` (never called here: only its pickle is built)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, (self.command,))


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "pwned"
    yield path
    assert not path.exists(), "the refused pickle ran code"


@pytest.mark.parametrize("compress", [True, False])
def test_pickle_with_code_is_refused(tmp_path: Path, marker: Path, compress: bool) -> None:
    payload = pickle.dumps([np.zeros(3, np.float32), _Shell(f"touch {marker}")], protocol=4)
    assert any(op.name == "STACK_GLOBAL" for op, _, _ in pickletools.genops(payload))
    path = tmp_path / "evil.lz4"
    path.write_bytes(_lz4(payload) if compress else payload)
    with pytest.raises(FaceDetectorError, match=r"refused to load global '(posix|os|nt)\.system'"):
        read_numpy_pickle(path)


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(S'1+1'\ntR.",  # protocol 0 GLOBAL + REDUCE
        pickle.dumps(np.array([1, "a"], dtype=object)),  # numpy's own helpers, but Python objects inside
        pickle.dumps({"not": "arrays"}),
    ],
)
def test_non_numeric_pickles_are_refused(tmp_path: Path, payload: bytes) -> None:
    path = tmp_path / "bad.lz4"
    path.write_bytes(_lz4(payload))
    with pytest.raises(FaceDetectorError):
        read_numpy_pickle(path)


def test_joblib_and_plain_numpy_pickles_are_read(tmp_path: Path) -> None:
    import joblib

    arrays = [
        np.arange(12, dtype=np.float32).reshape(3, 4),
        np.asfortranarray(np.eye(3)),
        np.arange(5, dtype=">i4"),
    ]
    joblib.dump(arrays, tmp_path / "w.lz4", compress="lz4")
    for got, want in zip(read_numpy_pickle(tmp_path / "w.lz4"), arrays, strict=True):
        np.testing.assert_array_equal(got, want)
    (tmp_path / "p.pkl").write_bytes(pickle.dumps(arrays))
    for got, want in zip(read_numpy_pickle(tmp_path / "p.pkl"), arrays, strict=True):
        np.testing.assert_array_equal(got, want)


def test_missing_or_wrong_weights(tmp_path: Path) -> None:
    with pytest.raises(FaceDetectorError, match="not found"):
        MTCNNDetector.load(weights_dir=tmp_path)
    for name in ("pnet.lz4", "rnet.lz4", "onet.lz4"):
        (tmp_path / name).write_bytes(_lz4(pickle.dumps([np.zeros((3, 3, 3, 10), np.float32)])))
    with pytest.raises(FaceDetectorError, match="too few arrays"):
        MTCNNDetector.load(weights_dir=tmp_path)
    (tmp_path / "pnet.lz4").write_bytes(b"\x04\x22\x4d\x18garbage")
    with pytest.raises(FaceDetectorError, match=r"pnet\.lz4"):
        MTCNNDetector.load(weights_dir=tmp_path)


def test_results_are_read_only(detector: MTCNNDetector) -> None:
    (face,) = detector.detect(photos.astronaut())
    with pytest.raises(ValueError):
        face.landmarks[0, 0] = 0
    with pytest.raises(AttributeError):
        face.score = 0.5  # type: ignore[misc]
