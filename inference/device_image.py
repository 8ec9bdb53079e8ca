"""uint8 image resizes and turns on tensors, on any device, that give the same bytes as the host's.

The host resizes with OpenCV (:func:`inference.geometry.resize_rgb`, ``cv2.resize``): the area filter
(``INTER_AREA``) on the sides that shrink, bilinear (``INTER_LINEAR``) on the sides that grow, in the
steps :func:`resize_steps` plans. On CUDA the pipeline keeps an image on the device from its one
host → device copy to its one device → host copy, and the GPU decoder (:mod:`serving.gpu_codec`)
hands over device tensors. The resizes and EXIF turns done there must not change a single value
against the CPU path, so they are written here as OpenCV computes them for 8-bit images, not as
torch's interpolation does (torch's bilinear and area modes weight and round differently):

* **area, whole factors** (both sides divided by whole numbers, as OpenCV decides it: ``1 / (out /
  in)`` within ``DBL_EPSILON`` of an integer on both sides): each output value is the sum of its
  block, then ``(sum + 2) >> 2`` for 2×2 blocks of 1, 3 or 4 channels, ``round(sum · (1/n))``
  otherwise (``1/n`` and the product in float32, rounded half to even).
* **area, any other factors**: along each side, the source pixels an output pixel covers, each
  weighted by the fraction of the output pixel it covers (OpenCV's table, from float64 positions,
  weights cast to float32; a sliver under 0.001 pixel is left out); the columns of every source row
  summed first, then the rows, one term after the other in float32 (a product, then a sum: no
  fused multiply-add), rounded half to even.
* **linear**: per output column, ``f = (x + 0.5)·in/out - 0.5`` (in float64, then taken to
  float32), the source columns ``⌊f⌋`` and ``⌊f⌋ + 1`` weighted ``1 - (f - ⌊f⌋)`` and ``f - ⌊f⌋``
  rounded to 11-bit fixed point (2048 = 1; clamped to the edge pixel with weights 2048 and 0
  outside); the same per output row, whose source rows are clamped but keep their weights. The
  horizontal pass is an exact integer sum; the vertical one is OpenCV's vector arithmetic for
  every value: each row's sum shifted right by 4, multiplied by its weight keeping the high 16
  bits of the product, the two added, then ``(s + 2) >> 2``.

The integer and float32 work runs on the tensor's device and is exact there (IEEE products and
sums, each rounded once); only the small tables are built on the host. Whether this process's
OpenCV computes exactly this is checked once, on the CPU (:func:`opencv_agrees`); where it does not
(another OpenCV build), :func:`resize_like_host` resizes on the host and copies back, so the bytes
stay the host's either way. ``tests/inference/test_device_image.py`` compares it with OpenCV byte
for byte over many sizes; ``bench/gpu.sh`` checks it on a GPU.

* :func:`transpose` is Pillow's ``Image.transpose`` (the EXIF orientation turns; the host decodes
  with Pillow).
* :func:`to_device` copies a host array to a CUDA device without making the host wait for the
  work already queued there (pinned staging, ``non_blocking``); on the CPU it is ``torch.from_numpy``.

The CPU path resizes with OpenCV itself (several times faster than this on a CPU).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Final, Literal

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

log = logging.getLogger(__name__)

#: The filter of one resize step: ``INTER_AREA`` (shrink) or ``INTER_LINEAR`` (enlarge).
Filter = Literal["area", "linear"]

#: OpenCV's flag for each filter.
_CV2_FLAGS: Final[dict[Filter, int]] = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR}
#: OpenCV's fixed-point weights of the bilinear filter on 8-bit images: 11 bits (2048 = 1).
_LINEAR_BITS: Final = 11
#: Most cached weight tables (one per input size, output size and kind).
_TABLE_CACHE: Final = 256

#: One ``cv2.resize`` call: the filter and the (height, width) it resizes to.
Step = tuple[Filter, int, int]


def resize_steps(size: tuple[int, int], height: int, width: int) -> tuple[Step, ...]:
    """The ``cv2.resize`` calls that bring an image of ``size`` (height, width) to ``height`` ×
    ``width``: none when it has that size; one with the area filter when no side grows, one bilinear
    when no side shrinks; when one side shrinks and the other grows, the shrinking side first with
    the area filter (the other kept), then the growing one bilinear, so neither side is filtered
    with the other's filter (bilinear would skip pixels where a side shrinks)."""
    in_h, in_w = size
    if (in_h, in_w) == (height, width):
        return ()
    if height <= in_h and width <= in_w:
        return (("area", height, width),)
    if height >= in_h and width >= in_w:
        return (("linear", height, width),)
    if height < in_h:
        return (("area", height, in_w), ("linear", height, width))
    return (("area", in_h, width), ("linear", height, width))


def resize_array(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) (or (H, W)) uint8 host array → (height, width, C) (or (height, width)) with OpenCV,
    in :func:`resize_steps`' steps; the array itself when it has that size already."""
    out = rgb
    for kind, h, w in resize_steps((rgb.shape[0], rgb.shape[1]), height, width):
        out = cv2.resize(out, (w, h), interpolation=_CV2_FLAGS[kind])
        if out.ndim < rgb.ndim:  # OpenCV hands back a single channel as (h, w)
            out = out[:, :, None]
    return out


# -- the tables --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=_TABLE_CACHE)
def _linear_table(in_size: int, out_size: int, columns: bool) -> tuple[np.ndarray, ...]:
    """OpenCV's bilinear taps along one side: the two source indices (out,) int64 and their 11-bit
    weights (out,) int32 of every output index. ``columns``: the horizontal side, where an output
    pixel past either edge takes the edge pixel with weights 2048 and 0; on the vertical side the
    source rows are clamped to the image and the weights kept (what OpenCV does there)."""
    scale = 1.0 / (out_size / in_size)  # OpenCV keeps the inverse of out / in, in float64
    position = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position)
    fraction = (position - first).astype(np.float32)
    index = first.astype(np.int64)
    if columns:
        outside = (index < 0) | (index >= in_size - 1)
        fraction[outside] = 0.0
        index = np.clip(index, 0, in_size - 1)
    one = float(1 << _LINEAR_BITS)
    w0 = np.rint((np.float32(1.0) - fraction) * np.float32(one)).astype(np.int32)
    w1 = np.rint(fraction * np.float32(one)).astype(np.int32)
    i0 = np.clip(index, 0, in_size - 1)
    i1 = np.clip(index + 1, 0, in_size - 1)
    return i0, i1, w0, w1


@functools.lru_cache(maxsize=_TABLE_CACHE)
def _area_table(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's area taps along one side (``in_size`` ≥ ``out_size``): source index (out, k) int64 and
    float32 weight (out, k) of every output index, in OpenCV's order (the partly covered pixel
    before, the wholly covered ones, the partly covered one after); missing taps at the end get
    weight 0 and a valid index (adding 0 changes no float32 sum here: every term is ≥ 0).

    Positions and widths in float64, step for step as OpenCV computes them (the last bit matters)."""
    scale = 1.0 / (out_size / in_size)
    start = np.arange(out_size, dtype=np.float64) * scale
    end = start + scale
    cell = np.minimum(scale, in_size - start)
    first = np.minimum(np.ceil(start), np.minimum(np.floor(end), in_size - 1))
    last = np.minimum(np.floor(end), in_size - 1)
    before = first - start > 1e-3
    after = end - last > 1e-3
    whole = (last - first).astype(np.int64)
    k = int((before + whole + after).max())
    index = np.zeros((out_size, k), dtype=np.int64)
    weight = np.zeros((out_size, k), dtype=np.float32)
    rows = np.arange(out_size)
    column = np.zeros(out_size, dtype=np.int64)
    # The pixel partly covered at the start.
    index[before, 0] = (first[before] - 1).astype(np.int64)
    weight[before, 0] = ((first - start) / cell)[before].astype(np.float32)
    column += before
    # The wholly covered pixels, each 1 / cell.
    full = (1.0 / cell).astype(np.float32)
    for j in range(int(whole.max(initial=0))):
        on = whole > j
        index[rows[on], column[on]] = first[on].astype(np.int64) + j
        weight[rows[on], column[on]] = full[on]
        column += on
    # The pixel partly covered at the end.
    index[rows[after], column[after]] = last[after].astype(np.int64)
    tail = np.minimum(np.minimum(end - last, 1.0), cell) / cell
    weight[rows[after], column[after]] = tail[after].astype(np.float32)
    return index, weight


def _whole_factors(size: tuple[int, int], height: int, width: int) -> tuple[int, int] | None:
    """(rows, columns) per output pixel when OpenCV takes both as whole factors (its "fast area"
    case), else None. OpenCV's test: ``1 / (out / in)`` within ``DBL_EPSILON`` of its rounding."""
    fy, fx = 1.0 / (height / size[0]), 1.0 / (width / size[1])
    iy, ix = round(fy), round(fx)
    if abs(fy - iy) < sys.float_info.epsilon and abs(fx - ix) < sys.float_info.epsilon:
        return iy, ix
    return None


def _on(array: np.ndarray, device: torch.device) -> Tensor:
    """A table on ``device``, copied per call on the caller's stream without a host wait: a table
    cached on the device could be read from another thread's stream before its copy landed, or be
    freed there while still in use (the copies are a few kilobytes)."""
    return to_device(array, device)


# -- the passes --------------------------------------------------------------------------------------


def _area(image: Tensor, height: int, width: int) -> Tensor:
    """``cv2.resize(..., INTER_AREA)`` of a (C, H, W) uint8 tensor to (C, height, width), no side
    growing."""
    channels, in_h, in_w = image.shape
    factors = _whole_factors((in_h, in_w), height, width)
    if factors is not None:
        fy, fx = factors
        blocks = image.reshape(channels, height, fy, width, fx).to(torch.int32).sum(dim=(2, 4))
        if fy == fx == 2 and channels != 2:
            return blocks.add_(2).bitwise_right_shift_(2).to(torch.uint8)
        mean = blocks.to(torch.float32).mul_(float(np.float32(1.0) / np.float32(fy * fx)))
        return mean.round_().clamp_(0, 255).to(torch.uint8)
    rows = image.to(torch.float32)
    if in_w != width:
        rows = _weighted(image, *_area_table(in_w, width), dim=-1)
    out = rows if in_h == height else _weighted(rows, *_area_table(in_h, height), dim=-2)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _weighted(image: Tensor, index: np.ndarray, weight: np.ndarray, dim: int) -> Tensor:
    """Σ_k image[…, index[:, k], …] · weight[:, k] along ``dim`` (-1 or -2), in float32, one term
    after the other (a product rounded, then a sum rounded: no fused multiply-add)."""
    idx, w = _on(index, image.device), _on(weight, image.device)
    total: Tensor | None = None
    for k in range(idx.shape[1]):
        term = image.index_select(dim, idx[:, k]).to(torch.float32)
        term.mul_(w[:, k] if dim == -1 else w[:, k, None])
        total = term if total is None else total.add_(term)
    assert total is not None
    return total


def _linear(image: Tensor, height: int, width: int) -> Tensor:
    """``cv2.resize(..., INTER_LINEAR)`` of a (C, H, W) uint8 tensor to (C, height, width), no side
    shrinking (the only use here; OpenCV turns an exact halving into the area filter)."""
    _, in_h, in_w = image.shape
    if in_w == width:  # every column its own with weights (2048, 0)
        rows = image.to(torch.int32).bitwise_left_shift_(_LINEAR_BITS)
    else:
        i0, i1, w0, w1 = (_on(a, image.device) for a in _linear_table(in_w, width, True))
        rows = image.index_select(-1, i0).to(torch.int32).mul_(w0)
        rows.add_(image.index_select(-1, i1).to(torch.int32).mul_(w1))
    r0, r1, b0, b1 = (_on(a, image.device) for a in _linear_table(in_h, height, False))
    top = rows.index_select(-2, r0).bitwise_right_shift_(4).mul_(b0[:, None]).bitwise_right_shift_(16)
    bottom = rows.index_select(-2, r1).bitwise_right_shift_(4).mul_(b1[:, None]).bitwise_right_shift_(16)
    return top.add_(bottom).add_(2).bitwise_right_shift_(2).clamp_(0, 255).to(torch.uint8)


_PASSES: Final[dict[Filter, Callable[[Tensor, int, int], Tensor]]] = {"area": _area, "linear": _linear}


def opencv_resize(image: Tensor, height: int, width: int) -> Tensor:
    """(C, H, W) uint8 → (C, height, width) uint8 by this module's arithmetic, on the tensor's device:
    what :func:`resize_array` gives (when :func:`opencv_agrees`); an image of that size already is
    returned as it is."""
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize needs a (C, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"resize needs a positive size, got {height}×{width}")
    out = image
    for kind, h, w in resize_steps((image.shape[-2], image.shape[-1]), height, width):
        out = _PASSES[kind](out, h, w)
    return out


#: (height, width) → (height, width) resizes that exercise every case above: whole factors (2×2,
#: 3×2, 1×3), other factors (odd sizes, a single row), enlarging (an odd number of values a row:
#: vector tails), one side shrinking while the other grows, both ways round.
_PROBES: Final = (
    ((12, 20), (6, 10)),
    ((12, 20), (4, 10)),
    ((9, 21), (9, 7)),
    ((17, 23), (7, 11)),
    ((1, 29), (1, 10)),
    ((9, 13), (20, 31)),
    ((1, 7), (5, 23)),
    ((20, 9), (7, 15)),
    ((9, 20), (15, 7)),
)


@functools.cache
def opencv_agrees() -> bool:
    """Whether this module's arithmetic gives this process's OpenCV bytes, found once by resizing
    small random images (3 channels, as the pipeline's) both ways on the CPU; False would mean an
    OpenCV build that computes otherwise (then :func:`resize_like_host` resizes on the host)."""
    rng = np.random.default_rng(0)
    for src, (h, w) in _PROBES:
        pixels = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
        got = opencv_resize(torch.from_numpy(pixels).permute(2, 0, 1), h, w).permute(1, 2, 0).numpy()
        if not np.array_equal(got, resize_array(pixels, h, w)):
            log.warning(
                "OpenCV %s resizes %s → %s differently from inference.device_image's arithmetic: "
                "device resizes go through the host",
                cv2.__version__,
                src,
                (h, w),
            )
            return False
    return True


def resize_like_host(image: Tensor, height: int, width: int) -> Tensor:
    """(C, H, W) uint8 on any device → (C, height, width) uint8 on the same device, the bytes
    :func:`inference.geometry.resize_rgb` gives on the host: by :func:`opencv_resize` on the device,
    or, where this process's OpenCV computes otherwise (:func:`opencv_agrees`), by OpenCV on the host
    and copied back."""
    if opencv_agrees() or tuple(image.shape[-2:]) == (height, width):
        return opencv_resize(image, height, width)
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize needs a (C, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    host = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
    return to_device(np.ascontiguousarray(resize_array(host, height, width)), image.device).permute(2, 0, 1)


#: Pillow's transposes as tensor operations on the last two axes (height, width).
_TRANSPOSES: Final[dict[Image.Transpose, Callable[[Tensor], Tensor]]] = {
    Image.Transpose.FLIP_LEFT_RIGHT: lambda x: x.flip(-1),
    Image.Transpose.FLIP_TOP_BOTTOM: lambda x: x.flip(-2),
    Image.Transpose.ROTATE_180: lambda x: x.flip(-2, -1),
    Image.Transpose.ROTATE_90: lambda x: torch.rot90(x, 1, dims=(-2, -1)),
    Image.Transpose.ROTATE_270: lambda x: torch.rot90(x, -1, dims=(-2, -1)),
    Image.Transpose.TRANSPOSE: lambda x: x.transpose(-2, -1),
    Image.Transpose.TRANSVERSE: lambda x: x.flip(-2, -1).transpose(-2, -1),
}


def transpose(image: Tensor, method: Image.Transpose) -> Tensor:
    """(C, H, W) → what Pillow's ``Image.transpose(method)`` gives, as a contiguous tensor."""
    return _TRANSPOSES[method](image).contiguous()


def to_device(array: np.ndarray, device: torch.device) -> Tensor:
    """A host array as a tensor on ``device``: on CUDA through pinned memory with ``non_blocking``,
    so the host does not wait for the kernels already queued (a copy from pageable memory would);
    the caching host allocator keeps the pinned copy alive until the transfer is done. On the CPU,
    ``torch.from_numpy`` (no copy)."""
    tensor = torch.from_numpy(array)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
