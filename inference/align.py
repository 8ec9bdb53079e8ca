"""Face alignment as the official DCT-Net pipeline does it: 5 landmarks → a 288x288 head crop and back.

The head generator was trained on crops made by ModelScope's ``warp_and_crop_face`` (docs/model.md
§4.3), so we reproduce that transform rather than any textbook fit:

* **Reference points.** The 96x112 MTCNN template (+1 px), made square (x + 8 → a 112x112 template),
  shrunk towards the template centre by :data:`CROP_RATIO` and scaled to :data:`CROP_SIZE`:
  ``((ref - 56) * 0.75 + 56) * 288 / 112``. Upstream does that arithmetic in float32 and also rounds the
  landmarks to float32 before fitting; we do the same, so our matrices agree with upstream's to 1e-7 or
  better instead of 1e-5 (float32 rounding of a ~200 px coordinate); what remains is the rounding of
  upstream's ``lstsq`` (our closed form is within 1e-13 of the exact solution). All far below a pixel.
* **The fit is MATLAB ``cp2tform('similarity')``.** The similarity is solved by least squares *from the
  reference points to the landmarks* and then inverted to get the image → crop matrix. That is not the
  least-squares fit from landmarks to reference (``cv2.estimateAffinePartial2D``, skimage): crop corners
  move by up to ~20 px between the two, so a different fit would feed the network crops it never saw.
* **Reflective candidate.** A second similarity is fitted to the reference mirrored in x, then mirrored
  back; the candidate with the smaller residual wins, ties going to the non-reflective one.
* **Upstream's aliasing quirk, reproduced.** ``findSimilarity`` mirrors the reference *in place* through
  an alias (``xyR = xy``) before it scores the candidates, so both residuals are measured against the
  *mirrored* reference. Expanding the square, each score gains ``4·Σ xᵢ·eₓᵢ`` (residual x weighted by the
  reference x, all ≈ 110..180 px), which can reorder two near-equal fits. Measured over random 5-point
  sets (uniform rotation, scale 0.2-4, half of them mirrored): with landmark noise up to ~12% of the
  inter-ocular distance the quirky and textbook choices never differed (the non-reflective fit always
  wins for faces, the reflective one always wins for mirrored faces); with noise of 18%, 30% and 60% of
  it they differed in 0.1%, 0.9% and 1.5% of sets, and in 0.5% of uniformly random point sets. So it
  never matters for real faces, but we score exactly as upstream does so parity holds everywhere.
  (The alias also negates the x of the caller's ``dst_pts`` array in place; ours does not mutate inputs.)

Matrices follow cv2's convention: a 2x3 ``M`` maps a source pixel centre ``(x, y)`` (integer centres,
x right, y down) to ``M @ (x, y, 1)`` in the destination. :func:`crop_matrices` returns ``tfm``
(image → crop) and ``tfm_inv`` (crop → image), like ``warp_and_crop_face(..., return_trans_inv=True)``.

The warps run in torch on the image's device; :func:`warp_crops` and :func:`paste_back` treat every face
in one ``grid_sample`` call, :func:`paste_back_regions` makes one small call per face:

* :func:`warp_crops` = ``cv2.warpAffine(img, tfm, (288, 288), INTER_LINEAR, borderValue=(255,)*3)``.
  cv2 samples the source at ``tfm⁻¹ @ (x, y, 1)`` for every destination pixel; we build the same
  sampling grid as ``F.affine_grid`` (to the bit, at a fraction of its cost: :func:`_affine_grid`)
  and normalise pixel coordinates for ``align_corners=False``
  (``x_n = (2x + 1) / W - 1``). With ``align_corners=True`` (``x_n = 2x / (W - 1) - 1``) the result is the
  same in exact arithmetic, but a 1-pixel-wide image would divide by zero. The white constant border is
  exact, not a clamp: we warp ``image - 255`` with zero padding and add 255 back, so a sample half
  outside the image blends with white exactly like cv2's ``BORDER_CONSTANT``.
* :func:`paste_back` = ``cv2.warpAffine(crop, tfm_inv, (W, H), INTER_LINEAR, borderValue=0)`` for the
  head outputs and the alpha mask, as a full (F, C, H, W) tensor. :func:`paste_back_regions` computes the
  same values only inside each face's footprint box (:func:`footprint_box`); everything outside it is 0,
  so a pipeline blends ``mask * head + (1 - mask) * result`` inside the box alone. That is the API to use:
  its cost is the footprint area, not F x the whole image.

OpenCV 4 (what upstream ran) quantises sampling positions to 1/32 pixel (for uint8 also the weights, to
1/2¹⁵) and rounds uint8 results; we sample at float32 positions and return unrounded float32, so values
differ by a fraction of a level on average and by up to ~4.5 levels on the sharpest edges (OpenCV 5
samples at exact positions: there only its uint8 rounding, ≤ 0.5, remains).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from inference.device_image import to_device
from inference.errors import InputShapeError, ToonserveError

Float64Array = npt.NDArray[np.float64]


class AlignmentError(ToonserveError):
    """Face landmarks from which no crop can be made (wrong shape, not finite, or degenerate)."""


def _read_only(array: Float64Array) -> Float64Array:
    array.setflags(write=False)
    return array


#: Side of the square template the reference points are defined in.
REFERENCE_SIZE: Final = 112
#: The MTCNN 96x112 (WxH) template as published: left eye, right eye, nose tip, left and right mouth
#: corners, x/y. Upstream adds a 1 px offset, then ``default_square=True`` centres it in 112x112 (x + 8).
_MTCNN_TEMPLATE: Final = (
    (30.29459953, 51.69630051),
    (65.53179932, 51.50139999),
    (48.02519989, 71.73660278),
    (33.54930115, 92.3655014),
    (62.72990036, 92.20410156),
)
_MTCNN_TEMPLATE_WIDTH: Final = 96
_TEMPLATE_OFFSET: Final = 1.0
_SQUARE_SHIFT_X: Final = (REFERENCE_SIZE - _MTCNN_TEMPLATE_WIDTH) / 2
#: The 5 reference points in the 112x112 square template, (5, 2) float64, x/y, LE RE N ML MR.
REFERENCE_POINTS_112: Final = _read_only(
    np.array(_MTCNN_TEMPLATE) + _TEMPLATE_OFFSET + (_SQUARE_SHIFT_X, 0.0)
)
#: How far the points are pulled towards the template centre: the head crop shows more than the face.
CROP_RATIO: Final = 0.75
#: Side of the square head crop the head generator runs on.
CROP_SIZE: Final = 288
#: Fill of crop pixels that fall outside the image (white, any colour order).
CROP_BORDER_VALUE: Final = 255.0


def _crop_reference_points() -> Float64Array:
    # Float32 arithmetic step by step, as upstream's float32 array does it (see module docstring).
    ref = REFERENCE_POINTS_112.astype(np.float32)
    centre = np.float32(REFERENCE_SIZE / 2)
    ref = (ref - centre) * np.float32(CROP_RATIO) + centre
    ref = ref * np.float32(CROP_SIZE / REFERENCE_SIZE)
    return _read_only(ref.astype(np.float64))


#: The reference points in the 288 crop, (5, 2) float64 holding float32 values, x/y, LE RE N ML MR:
#: about (111.78, 137.63), (179.74, 137.25), (145.98, 176.28), (118.06, 216.06), (174.34, 215.75).
CROP_REFERENCE_POINTS: Final = _crop_reference_points()

#: Points closer together than this, relative to their coordinates, count as one point.
_COINCIDENT_RTOL: Final = 1e-9
#: A candidate whose relative scale is below this is numerically singular (its inverse is garbage).
_SINGULAR_RTOL: Final = 1e-12
#: Least relative scale (fitted scale / the largest possible) of the winning similarity; below it the
#: landmarks are not a face in any pose. Real faces reach 0.9 or more; random points rarely go below 0.1.
MIN_RELATIVE_SCALE: Final = 1e-3


def _as_points(points: npt.ArrayLike | Tensor, what: str) -> Float64Array:
    if isinstance(points, Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    try:
        array = np.array(points, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise AlignmentError(f"{what} must be numbers of shape (K, 2); got {type(points).__name__}.") from exc
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] < 2:
        raise AlignmentError(f"{what} must have shape (K, 2) with K ≥ 2; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise AlignmentError(f"{what} contain NaN or infinite coordinates.")
    return array


def _spread(points: Float64Array) -> float:
    """Root-mean-square distance of the points from their centroid."""
    return float(np.sqrt(np.mean(np.sum((points - points.mean(axis=0)) ** 2, axis=1))))


def _fit_similarity(src: Float64Array, dst: Float64Array) -> Float64Array:
    """Least-squares similarity **dst → src** as a 2x3 matrix ``[[a, b, tx], [-b, a, ty]]``.

    The cp2tform parametrisation ``u = a·x + b·y + tx``, ``v = -b·x + a·y + ty`` ((u, v) in src, (x, y)
    in dst), solved in closed form: with centred coordinates the normal equations are diagonal.
    """
    src_c = src - src.mean(axis=0)
    dst_c = dst - dst.mean(axis=0)
    norm = float(np.sum(dst_c**2))
    a = float(np.sum(dst_c[:, 0] * src_c[:, 0] + dst_c[:, 1] * src_c[:, 1])) / norm
    b = float(np.sum(dst_c[:, 1] * src_c[:, 0] - dst_c[:, 0] * src_c[:, 1])) / norm
    (src_x, src_y), (dst_x, dst_y) = src.mean(axis=0), dst.mean(axis=0)
    tx = src_x - a * dst_x - b * dst_y
    ty = src_y + b * dst_x - a * dst_y
    return np.array([[a, b, tx], [-b, a, ty]])


def invert_affine(matrices: Float64Array) -> Float64Array:
    """Inverse of 2x3 affine matrices, (..., 2, 3) float64 → (..., 2, 3) float64 (like
    ``cv2.invertAffineTransform``). Singular input gives inf/NaN; callers validate first."""
    linear = matrices[..., :2]
    det = linear[..., 0, 0] * linear[..., 1, 1] - linear[..., 0, 1] * linear[..., 1, 0]
    inv_linear = (
        np.stack(
            [
                np.stack([linear[..., 1, 1], -linear[..., 0, 1]], axis=-1),
                np.stack([-linear[..., 1, 0], linear[..., 0, 0]], axis=-1),
            ],
            axis=-2,
        )
        / det[..., None, None]
    )
    inv_shift = -np.einsum("...ij,...j->...i", inv_linear, matrices[..., 2])
    result: Float64Array = np.concatenate([inv_linear, inv_shift[..., None]], axis=-1)
    return result


def _apply(matrix: Float64Array, points: Float64Array) -> Float64Array:
    result: Float64Array = points @ matrix[:, :2].T + matrix[:, 2]
    return result


def similarity_transform(
    src_pts: npt.ArrayLike | Tensor, dst_pts: npt.ArrayLike | Tensor
) -> tuple[Float64Array, Float64Array]:
    """The similarity mapping ``src_pts`` onto ``dst_pts`` exactly as upstream's
    ``get_similarity_transform_for_cv2(src_pts, dst_pts, reflective=True)`` computes it.

    src_pts, dst_pts: (K, 2) x/y coordinates, K ≥ 2 (the pipeline: 5 landmarks in the image and the
    5 reference points in the crop). Inputs are read as float64 and never modified.

    Returns ``(tfm, tfm_inv)``, 2x3 float64 in cv2's convention: ``tfm`` maps src → dst (image → crop),
    ``tfm_inv`` maps dst → src (crop → image). See the module docstring for the fit and its quirk.

    Raises :class:`AlignmentError` if either point set has the wrong shape, is not finite or coincides
    in one point, or if the winning similarity is degenerate: its scale is below :data:`MIN_RELATIVE_SCALE`
    of the largest a least-squares fit can reach (``spread(src) / spread(dst)``), i.e. the points have
    almost no similarity-shaped component (five points on a line arranged so that both fits vanish, say).
    Real faces reach 0.9 or more, mirrored ones about 0.2 for the losing candidate. Upstream meets such
    input with ``LinAlgError`` or a crop zoomed out a million times; a candidate that is singular while the
    other is not simply loses (upstream's score for it tends to infinity).
    """
    src = _as_points(src_pts, "source points")
    dst = _as_points(dst_pts, "destination points")
    if src.shape != dst.shape:
        raise AlignmentError(f"source points {src.shape} and destination points {dst.shape} differ in shape.")
    src_spread, dst_spread = _spread(src), _spread(dst)
    for spread, pts, what in ((src_spread, src, "source"), (dst_spread, dst, "destination")):
        if spread <= _COINCIDENT_RTOL * max(1.0, float(np.abs(pts).max())):
            raise AlignmentError(f"The {what} points all coincide; a face needs distinct landmarks.")
    # Cauchy-Schwarz: a least-squares similarity's scale is at most spread(src) / spread(dst).
    max_scale = src_spread / dst_spread
    dst_mirrored = dst * (-1.0, 1.0)
    mirror = np.array([[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # x → -x, as a 2x3 matrix

    def candidate(to_src: Float64Array, undo: Float64Array | None) -> _Candidate:
        relative_scale = _scale(to_src) / max_scale
        if relative_scale <= _SINGULAR_RTOL:  # its inverse would be inf/NaN: upstream's score → ∞
            return _Candidate(relative_scale, np.inf, to_src, to_src)
        to_dst = invert_affine(to_src) if undo is None else _compose(undo, invert_affine(to_src))
        # Upstream's residual, measured against the *mirrored* reference (the aliasing quirk).
        residual = float(np.linalg.norm(_apply(to_dst, src) - dst_mirrored))
        return _Candidate(relative_scale, residual, to_dst, to_src if undo is None else invert_affine(to_dst))

    plain = candidate(_fit_similarity(src, dst), None)
    # Reflective: fitted from the mirrored reference, the mirror then undone on the crop side.
    reflective = candidate(_fit_similarity(src, dst_mirrored), mirror)
    # Ties go to the non-reflective candidate, as upstream's ``norm1 <= norm2``.
    best = plain if plain.residual <= reflective.residual else reflective
    if best.relative_scale < MIN_RELATIVE_SCALE:
        raise AlignmentError(
            "The face landmarks are degenerate: no similarity maps them onto the reference face "
            f"(relative scale {best.relative_scale:.2g})."
        )
    return best.to_dst, best.to_src


@dataclass(frozen=True)
class _Candidate:
    relative_scale: float
    residual: float
    to_dst: Float64Array
    to_src: Float64Array


def _scale(similarity: Float64Array) -> float:
    return float(np.hypot(similarity[0, 0], similarity[0, 1]))


def _compose(outer: Float64Array, inner: Float64Array) -> Float64Array:
    """2x3 affine ``outer ∘ inner`` (apply ``inner`` first), batched over leading dimensions."""
    linear = outer[..., :2] @ inner[..., :2]
    shift = np.einsum("...ij,...j->...i", outer[..., :2], inner[..., 2]) + outer[..., 2]
    result: Float64Array = np.concatenate([linear, shift[..., None]], axis=-1)
    return result


def crop_matrices(five_points: npt.ArrayLike | Tensor) -> tuple[Float64Array, Float64Array]:
    """The official head-crop transform for one face.

    five_points: (5, 2) image pixel coordinates x/y of left eye, right eye, nose tip, left and right
    mouth corners (image-left first, as the detector and ``get_f5p`` give them); any numeric type.

    Returns ``(tfm, tfm_inv)``, 2x3 float64: image → :data:`CROP_SIZE` crop and crop → image, equal to
    ``warp_and_crop_face(img, five_points, ratio=0.75, reference_pts=get_reference_facial_points(
    default_square=True), crop_size=(288, 288), return_trans_inv=True)``'s matrices (the landmarks are
    rounded to float32 first, as upstream does). Raises :class:`AlignmentError` for bad landmarks.
    """
    points = _as_points(five_points, "face landmarks")
    if points.shape != CROP_REFERENCE_POINTS.shape:
        raise AlignmentError(f"face landmarks must have shape (5, 2); got {points.shape}.")
    with np.errstate(over="ignore"):  # too large for float32: caught just below
        points32 = points.astype(np.float32)
    if not np.isfinite(points32).all():
        raise AlignmentError("face landmarks are too large to be image coordinates.")
    return similarity_transform(points32.astype(np.float64), CROP_REFERENCE_POINTS)


def _as_matrices(matrices: npt.ArrayLike | Tensor, what: str, batched: bool = True) -> Float64Array:
    if isinstance(matrices, Tensor):
        matrices = matrices.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(matrices, dtype=np.float64)
    ndim, expected = (3, "(F, 2, 3)") if batched else (2, "(2, 3)")
    if array.ndim != ndim or array.shape[-2:] != (2, 3):
        raise InputShapeError(f"{what} must have shape {expected}; got {array.shape}.")
    if not np.isfinite(array).all():
        raise InputShapeError(f"{what} contain NaN or infinite entries.")
    return array


def _inverted(matrices: Float64Array, what: str) -> Float64Array:
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = invert_affine(matrices)
    if not np.isfinite(inverse).all():
        raise InputShapeError(f"{what} must be invertible.")
    return inverse


def _theta(
    out_to_in: Float64Array, out_size: tuple[int, int], in_size: tuple[int, int], device: torch.device
) -> Tensor:
    """``affine_grid`` parameters for pixel maps ``out_to_in`` (F, 2, 3): output pixel → input pixel.

    Both sides use ``align_corners=False`` normalisation, ``x_n = (2x + 1) / W - 1``, whose inverse is
    ``x = (W·x_n + W - 1) / 2``. Composed in float64, handed over as float32.
    """
    (out_h, out_w), (in_h, in_w) = out_size, in_size
    from_out = np.array([[out_w / 2, 0.0, (out_w - 1) / 2], [0.0, out_h / 2, (out_h - 1) / 2]])
    to_in = np.array([[2 / in_w, 0.0, 1 / in_w - 1], [0.0, 2 / in_h, 1 / in_h - 1]])
    theta = _compose(to_in, _compose(out_to_in, from_out))
    # On a GPU without a host wait for the queued work (a plain copy from pageable memory would).
    return to_device(theta.astype(np.float32), device)


def _affine_grid(
    theta: Tensor, size: tuple[int, int], rows: slice = slice(None), cols: slice = slice(None)
) -> Tensor:
    """``F.affine_grid(theta, [N, C, *size], align_corners=False)``, or only its ``rows`` × ``cols``
    part, computed point by point: every value ``(x·a + y·b) + c`` in float32, each product and sum
    rounded once in that order, from the same normalised coordinates (``linspace(-1, 1, n)·(n-1)/n``).
    That is what ``affine_grid``'s three-term matrix product computes on the CPU, to the bit
    (``tests/inference/test_align.py`` holds it to that), at a fraction of its cost (a 430×430 grid:
    0.4 ms against 1.9 on one thread, 0.3 against 1.0 on two). A GPU's matrix product may round
    otherwise (a fused multiply-add): there the positions may differ from ``affine_grid``'s in
    float32's last bit.
    theta: (N, 2, 3) float32; returns (N, h, w, 2) float32 on ``theta.device``.
    """
    height, width = size
    device = theta.device
    xs = (torch.linspace(-1, 1, width, device=device) * (width - 1) / width)[cols]
    ys = (torch.linspace(-1, 1, height, device=device) * (height - 1) / height)[rows]
    grid = torch.empty((theta.shape[0], ys.shape[0], xs.shape[0], 2), dtype=torch.float32, device=device)
    for n in range(theta.shape[0]):
        for k in range(2):
            a, b, c = theta[n, k]
            torch.add((xs * a)[None, :], (ys * b)[:, None], out=grid[n, :, :, k]).add_(c)
    return grid


def _check_image(image: Tensor, what: str) -> None:
    if image.ndim != 3 or image.shape[0] < 1 or image.shape[1] < 1 or image.shape[2] < 1:
        raise InputShapeError(f"{what} must be a (C, H, W) tensor; got shape {tuple(image.shape)}.")
    if image.dtype != torch.uint8 and not image.dtype.is_floating_point:
        raise InputShapeError(f"{what} must be uint8 or floating point; got {image.dtype}.")


def warp_crops(image: Tensor, matrices: npt.ArrayLike | Tensor) -> Tensor:
    """Cut every face's head crop out of ``image`` at once.

    image: (C, H, W), uint8 or float on the 0..255 scale (the pipeline: 3 channels, RGB), on any device.
    matrices: (F, 2, 3) image → crop (``tfm`` of :func:`crop_matrices`), numpy or torch.

    Returns (F, C, :data:`CROP_SIZE`, :data:`CROP_SIZE`) float32 on ``image.device``, 0..255, same
    channel order, unrounded: ``cv2.warpAffine(img, tfm, (288, 288), flags=INTER_LINEAR,
    borderValue=(255, 255, 255))`` per face (cv2 would round to uint8). Pixels sampled outside the image
    are white. Memory: the output, its sampling grid (F·288²·2 floats) and one float32 buffer of the
    image's size, of which only the pixels the crops read are written.
    """
    _check_image(image, "image")
    tfm = _as_matrices(matrices, "crop matrices")
    channels, height, width = image.shape
    if tfm.shape[0] == 0:
        return torch.empty((0, channels, CROP_SIZE, CROP_SIZE), dtype=torch.float32, device=image.device)
    count = tfm.shape[0]
    to_image = _inverted(tfm, "crop matrices")
    theta = _theta(to_image, (CROP_SIZE, CROP_SIZE), (height, width), image.device)
    grid = _affine_grid(theta, (CROP_SIZE, CROP_SIZE))
    # Zero padding of (image - 255), then + 255: a constant white border, blended exactly like cv2's.
    # Only the pixels some crop samples are converted (a face's crop reads a fraction of the photo);
    # the rest of the buffer is never read, so it is left as it is.
    shifted = torch.empty((channels, height, width), dtype=torch.float32, device=image.device)
    for index in range(count):
        region = (slice(None), *_sampled_box(to_image[index], (height, width)).slices)
        shifted[region].copy_(image[region]).sub_(CROP_BORDER_VALUE)
    batch = shifted.unsqueeze(0).expand(count, -1, -1, -1)  # a view: the image is not copied F times
    crops = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return crops.add_(CROP_BORDER_VALUE)


def _sampled_box(crop_to_image: Float64Array, size: tuple[int, int]) -> Box:
    """The pixels of an (H, W) image that a crop cut with ``crop_to_image`` (2x3) reads: its pixel
    centres land inside the image of the crop's corner pixels, and each sample reads the pixel at or
    before it and the next one; a pixel more on every side against float32 rounding."""
    corners = _apply(
        crop_to_image,
        np.array([[0.0, 0.0], [CROP_SIZE - 1, 0.0], [0.0, CROP_SIZE - 1], [CROP_SIZE - 1, CROP_SIZE - 1]]),
    )
    left, top = np.floor(corners.min(axis=0)).astype(int) - 1
    right, bottom = np.floor(corners.max(axis=0)).astype(int) + 3
    height, width = size
    return Box(
        top=int(np.clip(top, 0, height)),
        left=int(np.clip(left, 0, width)),
        bottom=int(np.clip(bottom, 0, height)),
        right=int(np.clip(right, 0, width)),
    )


def _check_crops(crops: Tensor, count: int) -> None:
    if crops.ndim != 4 or crops.shape[0] != count or crops.shape[2:] != (CROP_SIZE, CROP_SIZE):
        raise InputShapeError(
            f"crops must be (F={count}, C, {CROP_SIZE}, {CROP_SIZE}); got shape {tuple(crops.shape)}."
        )
    if not crops.dtype.is_floating_point:
        raise InputShapeError(f"crops must be floating point; got {crops.dtype}.")


def _check_size(out_size: tuple[int, int]) -> tuple[int, int]:
    height, width = out_size
    if height < 1 or width < 1:
        raise InputShapeError(f"out_size must be positive (H, W); got {out_size}.")
    return int(height), int(width)


def paste_back(crops: Tensor, inverse: npt.ArrayLike | Tensor, out_size: tuple[int, int]) -> Tensor:
    """Warp every crop back into a full image frame at once.

    crops: (F, C, 288, 288) float, any channel order and range; the pipeline stacks the BGR head outputs
    and the alpha mask as a fourth channel, so both go through one call. Computed in float32 whatever
    the dtype: a half-precision sampling grid would misplace pixels. inverse: (F, 2, 3) crop → image
    (``tfm_inv`` of :func:`crop_matrices`). out_size: (H, W) of the image.

    Returns (F, C, H, W) float32 on ``crops.device``: ``cv2.warpAffine(crop, tfm_inv, (W, H),
    flags=INTER_LINEAR, borderValue=0)`` per face, 0 outside each face's footprint.

    Memory: F·C·H·W output values plus an F·H·W·2 float32 grid — 66 MB for 4 faces x 4 channels at
    720x960, growing with faces x pixels. Prefer :func:`paste_back_regions`, which only computes each
    face's footprint box.
    """
    tfm_inv = _as_matrices(inverse, "inverse matrices")
    _check_crops(crops, tfm_inv.shape[0])
    height, width = _check_size(out_size)
    count, channels = crops.shape[:2]
    if count == 0:
        return crops.new_zeros((0, channels, height, width), dtype=torch.float32)
    to_crop = _inverted(tfm_inv, "inverse matrices")
    theta = _theta(to_crop, (height, width), (CROP_SIZE, CROP_SIZE), crops.device)
    grid = F.affine_grid(theta, [count, channels, height, width], align_corners=False)
    source = crops.to(torch.float32)
    return F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@dataclass(frozen=True)
class Box:
    """An axis-aligned pixel box ``[top, bottom) x [left, right)`` inside an image; may be empty."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return max(0, self.bottom - self.top)

    @property
    def width(self) -> int:
        return max(0, self.right - self.left)

    @property
    def is_empty(self) -> bool:
        return self.height == 0 or self.width == 0

    @property
    def slices(self) -> tuple[slice, slice]:
        """Row and column slices: ``image[..., *box.slices]`` is the box of a (..., H, W) tensor."""
        return slice(self.top, self.top + self.height), slice(self.left, self.left + self.width)


def footprint_box(
    inverse: npt.ArrayLike | Tensor, out_size: tuple[int, int], support: Box | None = None
) -> Box:
    """The pixels of an (H, W) image that a crop pasted with ``inverse`` (2x3, crop → image) can touch.

    A pixel gets a non-zero bilinear value only if it samples the crop strictly inside (-1, 288) on
    both axes, so the box bounds the image of that square, widened by a pixel against rounding and
    clipped to the image. Every pixel outside it is exactly 0 in :func:`paste_back`'s result.
    ``support``: only the crop's pixels inside this box (in crop pixels) matter (the blend's mask
    is 0 elsewhere): the box bounds the image of ``(left - 1, right) × (top - 1, bottom)`` instead.
    """
    tfm_inv = _as_matrices(inverse, "inverse matrix", batched=False)
    height, width = _check_size(out_size)
    if support is not None and support.is_empty:
        return Box(0, 0, 0, 0)
    full = Box(0, 0, CROP_SIZE, CROP_SIZE)
    inside = full if support is None else support
    x0, y0, x1, y1 = inside.left - 1.0, inside.top - 1.0, float(inside.right), float(inside.bottom)
    corners = _apply(tfm_inv, np.array([[x0, y0], [x1, y0], [x0, y1], [x1, y1]]))
    left, top = np.floor(corners.min(axis=0)).astype(int)
    right, bottom = np.ceil(corners.max(axis=0)).astype(int) + 1
    return Box(
        top=int(np.clip(top, 0, height)),
        left=int(np.clip(left, 0, width)),
        bottom=int(np.clip(bottom, 0, height)),
        right=int(np.clip(right, 0, width)),
    )


@dataclass(frozen=True)
class Patch:
    """One face pasted back: ``values`` is ``paste_back(...)[f][..., *box.slices]``, (C, h, w)."""

    box: Box
    values: Tensor


def paste_back_regions(
    crops: Tensor, inverse: npt.ArrayLike | Tensor, out_size: tuple[int, int], support: Box | None = None
) -> list[Patch]:
    """:func:`paste_back`, computed only inside each face's :func:`footprint_box`.

    Same arguments; returns one :class:`Patch` per face, in order, each ``values`` (C, h, w) float32
    on ``crops.device`` (h or w is 0 if the face lies wholly outside the image). Outside
    its box a face's full-frame result is exactly 0, so ``result[..., *p.box.slices] = m * head +
    (1 - m) * result[..., *p.box.slices]`` blends faces in place. One ``grid_sample`` per face: the cost
    is the sum of the footprints (each about (288 x image-px-per-crop-px)² pixels, more when rotated),
    not F x H x W, and memory never holds a full frame per face. ``support`` (crop pixels): only the
    crops' values inside it matter to the caller (the blend's mask is 0 elsewhere, so the blend
    leaves those pixels as they are): each box is then the part of the footprint where that part of
    the crop lands (:func:`footprint_box` with ``support``), and its values are the ones the whole
    footprint's grid has there, bit for bit (:func:`_affine_grid` computes only that part of it).
    """
    tfm_inv = _as_matrices(inverse, "inverse matrices")
    _check_crops(crops, tfm_inv.shape[0])
    height, width = _check_size(out_size)
    to_crop = _inverted(tfm_inv, "inverse matrices")
    patches = []
    for index in range(tfm_inv.shape[0]):
        box = footprint_box(tfm_inv[index], (height, width))
        part = box
        if support is not None:
            part = _within(footprint_box(tfm_inv[index], (height, width), support), box)
        if part.is_empty:
            values = crops.new_zeros((crops.shape[1], part.height, part.width), dtype=torch.float32)
        else:
            # Box pixel (j, i) is image pixel (left + j, top + i).
            offset = np.array([[1.0, 0.0, box.left], [0.0, 1.0, box.top]])
            box_to_crop = _compose(to_crop[index], offset)[None]
            theta = _theta(box_to_crop, (box.height, box.width), (CROP_SIZE, CROP_SIZE), crops.device)
            rows = slice(part.top - box.top, part.bottom - box.top)
            cols = slice(part.left - box.left, part.right - box.left)
            grid = _affine_grid(theta, (box.height, box.width), rows, cols)
            source = crops[index : index + 1].to(torch.float32)
            sampled = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            values = sampled[0]
        patches.append(Patch(box=part, values=values))
    return patches


def _within(inner: Box, outer: Box) -> Box:
    """The part of ``inner`` inside ``outer`` (empty when they do not meet)."""
    top, left = max(inner.top, outer.top), max(inner.left, outer.left)
    bottom, right = min(inner.bottom, outer.bottom), min(inner.right, outer.right)
    if top >= bottom or left >= right:
        return Box(0, 0, 0, 0)
    return Box(top=top, left=left, bottom=bottom, right=right)
