"""Face alignment: parity with ModelScope's own ``align_trans.py``/``matlab_cp2tform.py`` and with cv2.

ModelScope's package ``modelscope.models.cv.cartoon`` imports dependencies we do not install, so the two
upstream files are loaded by path as a private package. They need cv2 (``opencv-python-headless``,
a dev dependency); the tests that use it skip without it.

Warp tolerances: OpenCV 4.x rounds each sampling position to 1/32 pixel (and uint8 weights to 1/2^15),
so on the sharpest edges of a photo (up to ~250 levels per pixel) it lands up to ~250/64 ≈ 4 levels
away from exact bilinear sampling, plus 0.5 for its uint8 rounding; OpenCV 5 samples at exact
positions. Measured on the astronaut photo (4 crops, two of them half outside the image):
warp_crops mean |diff| 0.17-0.27 levels, max 4.5 with OpenCV 4.14; max 0.51 with 5.0. paste_back
mean 0.03-0.12 inside the footprint, max 4.1 (4.14) / 0.02 (5.0). We assert mean < 0.5 and max ≤ 6.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from devkit.photos import astronaut
from devkit.upstream import load_upstream_align
from inference import align
from inference.align import (
    CROP_REFERENCE_POINTS,
    CROP_SIZE,
    REFERENCE_POINTS_112,
    AlignmentError,
    Box,
    crop_matrices,
    footprint_box,
    invert_affine,
    paste_back,
    paste_back_regions,
    similarity_transform,
    warp_crops,
)
from inference.errors import InputShapeError, ToonserveError

#: Hand-placed landmarks of the astronaut photo (512x512): eyes, nose tip, mouth corners.
ASTRONAUT_FIVE_POINTS = np.array(
    [(202.5, 101.0), (248.5, 103.0), (225.0, 127.5), (206.5, 143.5), (242.5, 143.5)]
)
MEAN_TOLERANCE = 0.5
MAX_TOLERANCE = 6.0


@pytest.fixture(scope="module")
def cv2() -> Any:
    return pytest.importorskip("cv2")


@pytest.fixture(scope="module")
def upstream(cv2: Any) -> types.SimpleNamespace:
    """ModelScope's ``align_trans`` and ``matlab_cp2tform`` modules, loaded from their files."""
    return load_upstream_align()


def _upstream_crop_reference(upstream: types.SimpleNamespace) -> np.ndarray:
    """The 288-crop reference points exactly as ``warp_and_crop_face`` computes them (float32)."""
    ref = np.asarray(upstream.align.get_reference_facial_points(default_square=True), dtype=np.float32)
    ref = (ref - 112 / 2) * 0.75 + 112 / 2
    ref *= CROP_SIZE / 112.0
    return ref


def _random_faces(
    rng: np.random.Generator, count: int, noise: float = 0.03, mirror_every: int = 5
) -> list[np.ndarray]:
    """Plausible landmark sets: the reference points under a random similarity (rotation ±60°, scale
    0.2-4, anywhere in a 2000 px image) plus Gaussian noise of ``noise`` x the inter-ocular distance;
    every ``mirror_every``-th set mirrored (left/right labels on the wrong sides)."""
    centred = CROP_REFERENCE_POINTS - CROP_REFERENCE_POINTS.mean(axis=0)
    eye_distance = float(np.linalg.norm(CROP_REFERENCE_POINTS[1] - CROP_REFERENCE_POINTS[0]))
    faces = []
    for index in range(count):
        angle = np.radians(rng.uniform(-60, 60))
        scale = rng.uniform(0.2, 4.0)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shape = centred * (-1.0, 1.0) if index % mirror_every == 0 else centred
        jitter = rng.normal(0.0, noise * eye_distance, (5, 2))
        faces.append((shape + jitter) @ rotation.T + rng.uniform(0, 2000, 2))
    return faces


def _is_reflective(matrix: np.ndarray) -> bool:
    return bool(np.linalg.det(matrix[:, :2]) < 0)


# --- reference points ---------------------------------------------------------------------------------


def test_reference_points_match_upstream(upstream: types.SimpleNamespace) -> None:
    np.testing.assert_array_equal(
        REFERENCE_POINTS_112, upstream.align.get_reference_facial_points(default_square=True)
    )
    np.testing.assert_allclose(CROP_REFERENCE_POINTS, _upstream_crop_reference(upstream), rtol=0, atol=1e-6)
    # Independently of how we replicate the scaling: landmarks at our reference points give the identity.
    _, tfm_inv = upstream.align.warp_and_crop_face(
        np.zeros((4, 4, 3), np.uint8),
        CROP_REFERENCE_POINTS,
        ratio=0.75,
        reference_pts=upstream.align.get_reference_facial_points(default_square=True),
        crop_size=(CROP_SIZE, CROP_SIZE),
        return_trans_inv=True,
    )
    np.testing.assert_allclose(tfm_inv, np.eye(2, 3), rtol=0, atol=1e-6)


def test_reference_points_values_from_the_model_reference() -> None:
    expected = [(111.78, 137.63), (179.74, 137.25), (145.98, 176.28), (118.06, 216.06), (174.34, 215.75)]
    np.testing.assert_allclose(CROP_REFERENCE_POINTS, expected, atol=0.005)
    assert not CROP_REFERENCE_POINTS.flags.writeable and not REFERENCE_POINTS_112.flags.writeable


# --- the transform ------------------------------------------------------------------------------------


def test_similarity_transform_matches_upstream(upstream: types.SimpleNamespace) -> None:
    faces = _random_faces(np.random.default_rng(0), 600)
    reflective = 0
    for src in faces:
        dst = CROP_REFERENCE_POINTS.copy()
        expected, expected_inv = upstream.cp2tform.get_similarity_transform_for_cv2(src.copy(), dst.copy())
        tfm, tfm_inv = similarity_transform(src, dst)
        np.testing.assert_allclose(tfm, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(tfm_inv, expected_inv, rtol=0, atol=1e-6)
        reflective += _is_reflective(tfm)
    assert reflective == len(faces) // 5  # exactly the mirrored sets take the reflective candidate


def test_crop_matrices_match_warp_and_crop_face(upstream: types.SimpleNamespace) -> None:
    tiny = np.zeros((2, 2, 3), np.uint8)  # the matrices do not depend on the image
    reference = upstream.align.get_reference_facial_points(default_square=True)
    for points in _random_faces(np.random.default_rng(1), 600):
        _, expected_inv = upstream.align.warp_and_crop_face(
            tiny, points, ratio=0.75, reference_pts=reference, crop_size=(288, 288), return_trans_inv=True
        )
        # warp_and_crop_face does not return tfm: same call it makes, same float32 inputs.
        expected, same_inv = upstream.cp2tform.get_similarity_transform_for_cv2(
            np.float32(points), _upstream_crop_reference(upstream)
        )
        np.testing.assert_array_equal(same_inv, expected_inv)
        tfm, tfm_inv = crop_matrices(points)
        np.testing.assert_allclose(tfm, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(tfm_inv, expected_inv, rtol=0, atol=1e-6)


def test_reflective_choice_reproduces_upstream_aliasing(upstream: types.SimpleNamespace) -> None:
    """Upstream scores both candidates against the mirrored reference (``xyR = xy`` aliases). On very
    noisy point sets that picks a different candidate than the textbook comparison now and then; we
    must follow upstream there too."""
    cp = upstream.cp2tform
    dst = CROP_REFERENCE_POINTS.copy()
    disagreements = 0
    for src in _random_faces(np.random.default_rng(2), 1500, noise=1.0, mirror_every=2):
        plain, _ = cp.findNonreflectiveSimilarity(src, dst.copy())
        mirrored, _ = cp.findNonreflectiveSimilarity(src, dst * (-1.0, 1.0))
        reflected = mirrored @ np.diag([-1.0, 1.0, 1.0])
        textbook_reflective = np.linalg.norm(cp.tformfwd(plain, src) - dst) > np.linalg.norm(
            cp.tformfwd(reflected, src) - dst
        )
        expected, expected_inv = cp.get_similarity_transform_for_cv2(src.copy(), dst.copy())
        if _is_reflective(expected) == textbook_reflective:
            continue
        disagreements += 1
        tfm, tfm_inv = similarity_transform(src, dst)
        assert _is_reflective(tfm) != textbook_reflective
        np.testing.assert_allclose(tfm, expected, rtol=0, atol=1e-6)
        np.testing.assert_allclose(tfm_inv, expected_inv, rtol=0, atol=1e-6)
    assert disagreements >= 5


def test_inputs_are_not_modified() -> None:
    src, dst = _random_faces(np.random.default_rng(3), 1)[0], CROP_REFERENCE_POINTS.copy()
    src_copy, dst_copy = src.copy(), dst.copy()
    similarity_transform(src, dst)
    np.testing.assert_array_equal(src, src_copy)
    np.testing.assert_array_equal(dst, dst_copy)


def test_matrices_are_inverse_and_map_landmarks() -> None:
    points = ASTRONAUT_FIVE_POINTS
    tfm, tfm_inv = crop_matrices(torch.tensor(points))  # tensors are accepted too
    np.testing.assert_allclose(invert_affine(tfm), tfm_inv, atol=1e-9)
    mapped = points @ tfm[:, :2].T + tfm[:, 2]
    assert np.abs(mapped - CROP_REFERENCE_POINTS).max() < 10.0  # hand-placed points: a few crop px


def _zero_scale_collinear_points() -> np.ndarray:
    """Five points on one horizontal line whose least-squares similarity from the reference has zero
    scale: offsets t ⟂ (1, x', y') of the centred reference, so both fitted coefficients vanish."""
    centred = CROP_REFERENCE_POINTS - CROP_REFERENCE_POINTS.mean(axis=0)
    constraints = np.stack([np.ones(5), centred[:, 0], centred[:, 1]])
    offsets = np.linalg.svd(constraints)[2][-1]  # a unit vector of the null space
    return np.stack([300.0 + 80.0 * offsets, np.full(5, 200.0)], axis=1)


@pytest.mark.parametrize(
    "points",
    [
        np.full((5, 2), 123.25),
        _zero_scale_collinear_points(),
        np.array([[1.0, 2.0]] * 4 + [[np.nan, 2.0]]),
        np.array([[1.0, 2.0]] * 4 + [[np.inf, 2.0]]),
        np.full((5, 2), 1e39) + np.arange(10).reshape(5, 2),  # not representable in float32
        np.zeros((4, 2)),
        np.zeros((5, 3)),
        np.zeros(10),
        [["a", "b"]] * 5,
    ],
    ids=["coincident", "collinear-zero-scale", "nan", "inf", "huge", "4-points", "3-columns", "flat", "text"],
)
def test_bad_landmarks_raise_alignment_error(points: Any) -> None:
    with pytest.raises(AlignmentError):
        crop_matrices(points)
    assert issubclass(AlignmentError, ToonserveError)


def test_collinear_points_still_match_upstream(upstream: types.SimpleNamespace) -> None:
    # A line of points is not singular for a similarity: upstream returns a transform, and so do we.
    points = np.stack([np.linspace(100, 300, 5), np.linspace(50, 90, 5)], axis=1)
    expected, expected_inv = upstream.cp2tform.get_similarity_transform_for_cv2(
        points.copy(), CROP_REFERENCE_POINTS.copy()
    )
    tfm, tfm_inv = similarity_transform(points, CROP_REFERENCE_POINTS)
    np.testing.assert_allclose(tfm, expected, atol=1e-6)
    np.testing.assert_allclose(tfm_inv, expected_inv, atol=1e-6)


# --- warps --------------------------------------------------------------------------------------------


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).contiguous()


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    array: np.ndarray = tensor.permute(1, 2, 0).cpu().numpy()
    return array


def _photo_faces() -> list[np.ndarray]:
    """The astronaut's landmarks plus three moved copies: rotated, small, mirrored, two of them at the
    image border so that their crops leave the image."""
    centre = ASTRONAUT_FIVE_POINTS.mean(axis=0)

    def moved(angle: float, scale: float, to: tuple[float, float], mirror: bool = False) -> np.ndarray:
        shape = (ASTRONAUT_FIVE_POINTS - centre) * ((-1.0, 1.0) if mirror else (1.0, 1.0))
        rad = np.radians(angle)
        rotation = scale * np.array([[np.cos(rad), -np.sin(rad)], [np.sin(rad), np.cos(rad)]])
        points: np.ndarray = shape @ rotation.T + to
        return points

    return [
        ASTRONAUT_FIVE_POINTS,
        moved(35, 1.3, (60, 450)),
        moved(-50, 0.6, (480, 30)),
        moved(17, 2.5, (300, 300), mirror=True),
    ]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return astronaut()


@pytest.fixture(scope="module")
def photo_matrices() -> tuple[np.ndarray, np.ndarray]:
    pairs = [crop_matrices(points) for points in _photo_faces()]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _sample_positions(tfm: np.ndarray, size: int) -> np.ndarray:
    """(size, size, 2) source pixel positions that each destination pixel samples."""
    ys, xs = np.mgrid[0:size, 0:size]
    homogeneous = np.stack([xs, ys, np.ones_like(xs)], axis=-1).astype(np.float64)
    positions: np.ndarray = homogeneous @ invert_affine(tfm).T
    return positions


def test_warp_crops_matches_cv2(
    cv2: Any, photo: np.ndarray, photo_matrices: tuple[np.ndarray, np.ndarray]
) -> None:
    tfm, _ = photo_matrices
    crops = warp_crops(_chw(photo), torch.from_numpy(tfm))
    assert crops.shape == (len(tfm), 3, CROP_SIZE, CROP_SIZE) and crops.dtype == torch.float32
    height, width = photo.shape[:2]
    for index in range(len(tfm)):
        expected = cv2.warpAffine(
            photo, tfm[index], (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderValue=(255, 255, 255)
        ).astype(np.float32)
        ours = _hwc(crops[index])
        diff = np.abs(ours - expected)
        assert diff.mean() < MEAN_TOLERANCE and diff.max() <= MAX_TOLERANCE, (index, diff.mean(), diff.max())
        # Pixels sampling a whole pixel or more outside the image are pure white in both.
        pos = _sample_positions(tfm[index], CROP_SIZE)
        outside = (pos[..., 0] <= -1) | (pos[..., 0] >= width) | (pos[..., 1] <= -1) | (pos[..., 1] >= height)
        assert (ours[outside] == 255).all() and (expected[outside] == 255).all()
        if index in (1, 2):
            assert outside.mean() > 0.1  # these crops do leave the image


def test_warp_crops_integer_translation_is_a_slice(photo: np.ndarray) -> None:
    """Pins the pixel-centre convention: a crop shifted by whole pixels is an exact slice, white beyond."""
    shifts = [(37, 101), (-20, 300)]
    matrices = np.array([[[1.0, 0.0, -dx], [0.0, 1.0, -dy]] for dx, dy in shifts])
    crops = warp_crops(_chw(photo), matrices)
    padded = np.full((512 + 2 * CROP_SIZE, 512 + 2 * CROP_SIZE, 3), 255.0, np.float32)
    padded[CROP_SIZE:-CROP_SIZE, CROP_SIZE:-CROP_SIZE] = photo
    for (dx, dy), crop in zip(shifts, crops, strict=True):
        window = padded[CROP_SIZE + dy : 2 * CROP_SIZE + dy, CROP_SIZE + dx : 2 * CROP_SIZE + dx]
        np.testing.assert_allclose(_hwc(crop), window, rtol=0, atol=0.02)


def test_warp_crops_accepts_float_images_and_keeps_them(photo: np.ndarray) -> None:
    tfm = crop_matrices(ASTRONAUT_FIVE_POINTS)[0][None]
    image = _chw(photo).float()
    before = image.clone()
    from_float = warp_crops(image, tfm)
    torch.testing.assert_close(from_float, warp_crops(_chw(photo), tfm))
    torch.testing.assert_close(image, before, rtol=0, atol=0)


def _alpha_like() -> np.ndarray:
    """A soft 288x288 mask on the 0..255 scale, like the blend mask, to paste with the head channels."""
    ys, xs = np.mgrid[0:CROP_SIZE, 0:CROP_SIZE] - (CROP_SIZE - 1) / 2
    alpha: np.ndarray = 255.0 * np.exp(-(xs**2 + ys**2) / (2 * 70.0**2))
    return alpha.astype(np.float32)


@pytest.fixture(scope="module")
def head_crops(cv2: Any, photo: np.ndarray, photo_matrices: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """(F, 288, 288, 4) float32: cv2's crops of the photo plus an alpha channel."""
    crops = [
        cv2.warpAffine(photo, m, (CROP_SIZE, CROP_SIZE), flags=cv2.INTER_LINEAR, borderValue=(255,) * 3)
        for m in photo_matrices[0]
    ]
    alpha = _alpha_like()[..., None]
    stacked: np.ndarray = np.stack([np.concatenate([c.astype(np.float32), alpha], axis=-1) for c in crops])
    return stacked


def test_paste_back_matches_cv2(
    cv2: Any, photo: np.ndarray, photo_matrices: tuple[np.ndarray, np.ndarray], head_crops: np.ndarray
) -> None:
    _, tfm_inv = photo_matrices
    height, width = photo.shape[:2]
    crops = torch.from_numpy(head_crops).permute(0, 3, 1, 2).contiguous()
    pasted = paste_back(crops, tfm_inv, (height, width))
    assert pasted.shape == (len(tfm_inv), 4, height, width) and pasted.dtype == torch.float32
    for index in range(len(tfm_inv)):
        expected = cv2.warpAffine(
            head_crops[index], tfm_inv[index], (width, height), flags=cv2.INTER_LINEAR, borderValue=0
        )
        ours = _hwc(pasted[index])
        diff = np.abs(ours - expected)
        footprint = (expected != 0).any(axis=-1) | (ours != 0).any(axis=-1)
        assert diff[footprint].mean() < MEAN_TOLERANCE, (index, diff[footprint].mean())
        assert diff.max() <= MAX_TOLERANCE, (index, diff.max())


def test_round_trip_reproduces_the_face(photo: np.ndarray) -> None:
    tfm, tfm_inv = crop_matrices(ASTRONAUT_FIVE_POINTS)
    # Image pixels whose crop position lies at least 2 px inside the crop: the face region.
    positions = _sample_positions(tfm_inv, 512)
    inside = ((positions >= 2) & (positions <= CROP_SIZE - 3)).all(axis=-1)
    assert inside.mean() > 0.1
    # Two bilinear resamplings (the crop magnifies about 1.5x) soften the photo's finest detail a little,
    # and leave a smooth image as it was (mean 0.24): a grid off by a tenth of a pixel doubles that.
    smooth = np.array(Image.fromarray(photo).filter(ImageFilter.GaussianBlur(2)))
    for image, mean_tolerance, p99_tolerance in ((photo, 2.5, 15.0), (smooth, 0.35, 1.6)):
        back = paste_back(warp_crops(_chw(image), tfm[None]), tfm_inv[None], image.shape[:2])[0]
        diff = np.abs(_hwc(back) - image.astype(np.float32))[inside]
        assert diff.mean() < mean_tolerance and np.quantile(diff, 0.99) < p99_tolerance, (
            diff.mean(),
            np.quantile(diff, 0.99),
        )
    # A whole-pixel translation round-trips exactly.
    shift = np.array([[1.0, 0.0, -100.0], [0.0, 1.0, -50.0]])
    back = paste_back(warp_crops(_chw(photo), shift[None]), invert_affine(shift)[None], photo.shape[:2])[0]
    np.testing.assert_allclose(
        _hwc(back)[50 : 50 + CROP_SIZE, 100 : 100 + CROP_SIZE],
        photo[50 : 50 + CROP_SIZE, 100 : 100 + CROP_SIZE],
        rtol=0,
        atol=0.02,
    )


def test_paste_back_regions_equal_full_frame(
    photo_matrices: tuple[np.ndarray, np.ndarray], head_crops: np.ndarray
) -> None:
    _, tfm_inv = photo_matrices
    # Add a face entirely outside the frame: its box is empty.
    far = tfm_inv[:1].copy()
    far[0, :, 2] += 5000.0
    tfm_inv = np.concatenate([tfm_inv, far])
    crops = torch.from_numpy(np.concatenate([head_crops, head_crops[:1]])).permute(0, 3, 1, 2).contiguous()
    size = (480, 512)
    full = paste_back(crops, tfm_inv, size)
    patches = paste_back_regions(crops, tfm_inv, size)
    assert len(patches) == len(tfm_inv)
    for index, patch in enumerate(patches):
        rows, cols = patch.box.slices
        assert patch.box == footprint_box(tfm_inv[index], size)
        assert patch.values.shape == (4, patch.box.height, patch.box.width)
        # The two float32 grids place samples ~1e-4 px apart: up to ~0.02 levels on sharp edges.
        torch.testing.assert_close(patch.values, full[index][:, rows, cols], rtol=0, atol=0.05)
        outside = full[index].clone()
        outside[:, rows, cols] = 0
        assert not outside.any()
        assert patch.box.is_empty == (index == len(patches) - 1)
    # The boxes are tight: a face fully inside the frame needs a fraction of it.
    assert patches[0].box.height * patches[0].box.width < 0.25 * size[0] * size[1]


def test_a_support_only_narrows_the_boxes_and_leaves_every_blend_as_it_was(
    photo_matrices: tuple[np.ndarray, np.ndarray], head_crops: np.ndarray
) -> None:
    _, tfm_inv = photo_matrices
    crops = torch.from_numpy(head_crops).permute(0, 3, 1, 2).contiguous()
    crops[:, 3] /= 255.0
    support = Box(top=20, left=40, bottom=270, right=250)
    crops[:, 3, : support.top] = 0  # the mask is 0 outside the support, as the blend's
    crops[:, 3, support.bottom :] = 0
    crops[:, 3, :, : support.left] = 0
    crops[:, 3, :, support.right :] = 0
    size = (480, 512)
    rng = np.random.default_rng(3)
    blended = []
    whole = paste_back_regions(crops, tfm_inv, size)
    narrow = paste_back_regions(crops, tfm_inv, size, support)
    for patches in (whole, narrow):
        result = torch.from_numpy(rng.uniform(0, 255, (3, *size)).astype(np.float32))
        rng = np.random.default_rng(3)  # the same starting image both times
        for patch in patches:
            region = result[(slice(None), *patch.box.slices)]
            region.mul_(1.0 - patch.values[3:]).add_(patch.values[:3] * patch.values[3:])
        blended.append(result)
    for full, part in zip(whole, narrow, strict=True):
        inner = part.box
        assert full.box.top <= inner.top and inner.bottom <= full.box.bottom
        assert full.box.left <= inner.left and inner.right <= full.box.right
        assert inner.height * inner.width < full.box.height * full.box.width
        rows = slice(inner.top - full.box.top, inner.bottom - full.box.top)
        cols = slice(inner.left - full.box.left, inner.right - full.box.left)
        assert torch.equal(full.values[:, rows, cols], part.values)  # the same samples, whatever the box
    assert torch.equal(blended[0], blended[1])
    assert footprint_box(tfm_inv[0], size, Box(0, 0, CROP_SIZE, CROP_SIZE)) == footprint_box(tfm_inv[0], size)
    assert footprint_box(tfm_inv[0], size, Box(5, 5, 5, 9)).is_empty


def test_the_pointwise_grid_is_affine_grids_to_the_bit() -> None:
    rng = np.random.default_rng(11)
    for _ in range(40):
        n = int(rng.integers(1, 4))
        height, width = (int(v) for v in rng.integers(1, 300, 2))
        spread = float(rng.choice([0.1, 1.0, 10.0]))
        theta = torch.from_numpy(rng.normal(0, spread, (n, 2, 3)).astype(np.float32))
        expected = F.affine_grid(theta, [n, 3, height, width], align_corners=False)
        assert torch.equal(align._affine_grid(theta, (height, width)), expected)
        rows = slice(int(rng.integers(0, height)), height)
        cols = slice(0, int(rng.integers(1, width + 1)))
        assert torch.equal(align._affine_grid(theta, (height, width), rows, cols), expected[:, rows, cols])


def test_crops_read_only_what_they_sample_and_give_the_whole_images_bytes(photo: np.ndarray) -> None:
    """warp_crops converts only the pixels its crops read: the bytes of converting the whole image
    (with affine_grid's grid), for faces inside, partly outside and wholly outside the photo."""
    height, width = photo.shape[:2]
    points = np.array([[-0.35, -0.3], [0.35, -0.3], [0.0, 0.05], [-0.25, 0.35], [0.25, 0.35]]) * 90
    centres = [(width / 2, height / 2), (5.0, 30.0), (width - 2.0, height + 20.0), (-400.0, 100.0)]
    tfm = np.stack([crop_matrices(points + centre)[0] for centre in centres])
    for image in (_chw(photo), _chw(photo).float(), _chw(photo).contiguous()):
        theta = align._theta(invert_affine(tfm), (CROP_SIZE, CROP_SIZE), (height, width), image.device)
        grid = F.affine_grid(theta, [len(tfm), 3, CROP_SIZE, CROP_SIZE], align_corners=False)
        whole = image.to(torch.float32, copy=True).sub_(255.0).unsqueeze(0).expand(len(tfm), -1, -1, -1)
        expected = F.grid_sample(whole, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        assert torch.equal(warp_crops(image, tfm), expected.add_(255.0))


def test_empty_batches(photo: np.ndarray) -> None:
    assert warp_crops(_chw(photo), np.zeros((0, 2, 3))).shape == (0, 3, CROP_SIZE, CROP_SIZE)
    empty = torch.zeros((0, 4, CROP_SIZE, CROP_SIZE))
    assert paste_back(empty, np.zeros((0, 2, 3)), (10, 20)).shape == (0, 4, 10, 20)
    assert paste_back_regions(empty, np.zeros((0, 2, 3)), (10, 20)) == []


def test_bad_tensor_shapes_raise_input_shape_error(photo: np.ndarray) -> None:
    tfm = np.eye(2, 3)[None]
    with pytest.raises(InputShapeError):
        warp_crops(_chw(photo)[None], tfm)
    with pytest.raises(InputShapeError):
        warp_crops(_chw(photo), np.eye(2, 3))
    with pytest.raises(InputShapeError):
        warp_crops(_chw(photo).to(torch.int32), tfm)
    with pytest.raises(InputShapeError):
        paste_back(torch.zeros((1, 3, 100, 100)), tfm, (10, 10))
    with pytest.raises(InputShapeError):
        paste_back(torch.zeros((2, 3, CROP_SIZE, CROP_SIZE)), tfm, (10, 10))
    with pytest.raises(InputShapeError):
        paste_back_regions(torch.zeros((1, 3, CROP_SIZE, CROP_SIZE)), tfm, (0, 10))
    with pytest.raises(InputShapeError):
        warp_crops(_chw(photo), np.zeros((1, 2, 3)))  # not invertible
    with pytest.raises(InputShapeError):
        paste_back_regions(torch.zeros((1, 3, CROP_SIZE, CROP_SIZE)), np.zeros((1, 2, 3)), (10, 10))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(photo: np.ndarray, photo_matrices: tuple[np.ndarray, np.ndarray]) -> None:
    tfm, tfm_inv = photo_matrices
    image = _chw(photo)
    crops = warp_crops(image.cuda(), tfm)
    assert crops.device.type == "cuda"
    torch.testing.assert_close(crops.cpu(), warp_crops(image, tfm), rtol=0, atol=0.05)
    pasted = paste_back(crops, torch.from_numpy(tfm_inv).cuda(), photo.shape[:2])
    torch.testing.assert_close(
        pasted.cpu(), paste_back(crops.cpu(), tfm_inv, photo.shape[:2]), rtol=0, atol=0.05
    )
    for gpu, cpu in zip(
        paste_back_regions(crops, tfm_inv, photo.shape[:2]),
        paste_back_regions(crops.cpu(), tfm_inv, photo.shape[:2]),
        strict=True,
    ):
        assert gpu.box == cpu.box and gpu.values.device.type == "cuda"
        torch.testing.assert_close(gpu.values.cpu(), cpu.values, rtol=0, atol=0.05)


def test_module_constants() -> None:
    assert align.CROP_SIZE == 288 and align.CROP_RATIO == 0.75 and align.REFERENCE_SIZE == 112
