"""uint8 image operations on tensors, on any device, that give the same bytes as the host's Pillow ones.

On CUDA the pipeline keeps an image on the device from its one host → device copy to its one
device → host copy, and the GPU decoder (:mod:`serving.gpu_codec`) hands over device tensors. The
resizes and EXIF turns done there must not change a single value against the CPU path, which does
them with Pillow, so they are written here as Pillow computes them, not as torch's interpolation
does (torch's bilinear and area modes weight and round differently):

* :func:`resize` is Pillow's two-pass ``Image.resize`` for 8-bit images with the ``BOX`` and
  ``BILINEAR`` filters: per output pixel, the filter's taps and weights computed in float64 as
  Pillow does, normalised, turned into 22-bit fixed point, then an integer sum rounded by adding
  half and shifting, one axis after the other (the intermediate clipped to uint8), in the order
  the installed Pillow uses (:func:`pillow_pass_order`, probed once). The integer part runs on the
  tensor's device and is exact there; only the small weight tables are built on the host.
  ``tests/inference/test_device_image.py`` compares it with Pillow byte for byte over many sizes.
* :func:`transpose` is Pillow's ``Image.transpose`` (the EXIF orientation turns).
* :func:`to_device` copies a host array to a CUDA device without making the host wait for the
  work already queued there (pinned staging, ``non_blocking``); on the CPU it is ``torch.from_numpy``.

The CPU path keeps using Pillow itself (faster than this on a CPU).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Final, Literal, get_args

import numpy as np
import torch
from PIL import Image
from torch import Tensor

Filter = Literal["box", "bilinear"]

#: Pillow's fixed-point precision for 8-bit resampling: 32 bits, less 8 for the sample, less 2 spare.
_PRECISION_BITS: Final = 32 - 8 - 2
#: Most cached weight tables (one per input size, output size and filter).
_TABLE_CACHE: Final = 256


def _box(x: np.ndarray) -> np.ndarray:
    return ((x > -0.5) & (x <= 0.5)).astype(np.float64)


def _triangle(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.maximum(1.0 - np.abs(x), 0.0)
    return out


#: Each filter's function and its support (half-width in source pixels at scale 1), as Pillow's.
_FILTERS: Final[dict[Filter, tuple[Callable[[np.ndarray], np.ndarray], float]]] = {
    "box": (_box, 0.5),
    "bilinear": (_triangle, 1.0),
}


@functools.lru_cache(maxsize=_TABLE_CACHE)
def _host_table(in_size: int, out_size: int, kind: Filter) -> tuple[np.ndarray, np.ndarray]:
    """Source index (out, k) int64 and fixed-point weight (out, k) int32 of every tap along one axis.

    Taps past a pixel's window get weight 0 and a valid index, so every row has ``k`` taps. The
    arithmetic is Pillow's, step for step in float64 (the order of operations matters for the last
    bit, and the last bit can move a rounded weight by one unit).
    """
    fn, base_support = _FILTERS[kind]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = base_support * filterscale
    k = math.ceil(support) * 2 + 1
    center = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # C's (int) cast truncates towards zero; np.trunc does the same.
    first = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    count = last - first
    taps = np.arange(k, dtype=np.int64)
    index = first[:, None] + taps[None, :]
    inside = taps[None, :] < count[:, None]
    weight = np.where(
        inside, fn(((index.astype(np.float64) - center[:, None]) + 0.5) * (1.0 / filterscale)), 0.0
    )
    # Pillow sums the weights one tap after the other; a pairwise sum could differ in the last bit.
    total = np.zeros(out_size, dtype=np.float64)
    for t in range(k):
        total = total + weight[:, t]
    weight = np.divide(weight, total[:, None], out=weight.copy(), where=total[:, None] != 0.0)
    scaled = weight * float(1 << _PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int32)
    return np.minimum(index, in_size - 1), fixed


def _table(in_size: int, out_size: int, kind: Filter, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_host_table` on ``device``. Copied per call, on the caller's stream, without a host
    wait: a table cached on the device could be read from another thread's stream before its copy
    landed, or be freed there while still in use (the copies are a few kilobytes)."""
    index, weight = _host_table(in_size, out_size, kind)
    return to_device(index, device), to_device(weight, device)


def _pass(image: Tensor, out_size: int, kind: Filter, dim: int) -> Tensor:
    """One Pillow pass along ``dim`` (-1: horizontal, -2: vertical) of a (C, H, W) uint8 tensor."""
    index, weight = _table(image.shape[dim], out_size, kind, image.device)
    shape = list(image.shape)
    shape[dim] = out_size
    acc = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    for t in range(index.shape[1]):
        taps = image.index_select(dim, index[:, t]).to(torch.int32)
        w = weight[:, t] if dim == -1 else weight[:, t, None]
        acc.add_(taps.mul_(w))
    return acc.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def resize(image: Tensor, height: int, width: int, kind: Filter) -> Tensor:
    """(C, H, W) uint8 → (C, height, width) uint8, what Pillow's ``resize`` with that filter gives.

    Each pass runs only when its side changes, in the order this process's Pillow uses
    (:func:`pillow_pass_order`); an unchanged image is returned as it is.
    """
    if image.dtype != torch.uint8 or image.dim() != 3:
        raise ValueError(f"resize needs a (C, H, W) uint8 tensor, got {tuple(image.shape)} {image.dtype}")
    if height < 1 or width < 1:
        raise ValueError(f"resize needs a positive size, got {height}×{width}")
    in_h, in_w = image.shape[-2], image.shape[-1]
    out = image
    if _vertical_first(pillow_pass_order(), (in_h, in_w), height, width):
        if in_h != height:
            out = _pass(out, height, kind, -2)
        if in_w != width:
            out = _pass(out, width, kind, -1)
    else:
        if in_w != width:
            out = _pass(out, width, kind, -1)
        if in_h != height:
            out = _pass(out, height, kind, -2)
    return out


PassOrder = Literal["width-first", "more-rows-removed-first"]
_PASS_ORDERS: Final[tuple[PassOrder, ...]] = get_args(PassOrder)


def _vertical_first(order: PassOrder | None, size: tuple[int, int], height: int, width: int) -> bool:
    """Whether the height pass goes first. Pillow up to 12 always resamples the width first. The
    Pillow 13 wheels go height first when the height loses more than twice as many pixels as the
    width does (found by comparing both orders with them over thousands of sizes, the boundary
    included: a tie goes width first)."""
    if order != "more-rows-removed-first":
        return False
    return height < size[0] and 2 * (size[1] - width) < size[0] - height


#: (height, width) → (height, width) resizes where the two pass orders give different bytes on the
#: probe image (checked with both Pillow behaviours), each way round.
_PROBES: Final = (((12, 12), (4, 11)), ((12, 12), (11, 4)), ((9, 20), (3, 31)), ((20, 9), (31, 3)))


@functools.cache
def pillow_pass_order() -> PassOrder | None:
    """Which pass order this process's Pillow uses, found once by resizing a small probe image both
    ways on the CPU and comparing with Pillow; None when neither matches (then :func:`resize` uses
    width first and may differ from Pillow by a level on some pixels: a Pillow change to look at)."""
    rng = np.random.default_rng(0)
    for order in _PASS_ORDERS:
        if all(_probe_matches(rng, order, src, dst, kind) for src, dst in _PROBES for kind in _FILTERS):
            return order
    return None


def _probe_matches(
    rng: np.random.Generator, order: PassOrder, src: tuple[int, int], dst: tuple[int, int], kind: Filter
) -> bool:
    pixels = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    resample = Image.Resampling.BOX if kind == "box" else Image.Resampling.BILINEAR
    expected = np.asarray(Image.fromarray(pixels).resize((dst[1], dst[0]), resample))
    image = torch.from_numpy(pixels).permute(2, 0, 1)
    if _vertical_first(order, src, *dst):
        got = _pass(_pass(image, dst[0], kind, -2), dst[1], kind, -1)
    else:
        got = _pass(_pass(image, dst[1], kind, -1), dst[0], kind, -2)
    return bool(np.array_equal(expected, got.permute(1, 2, 0).numpy()))


def shrinks(size: tuple[int, int], height: int, width: int) -> bool:
    """Whether going from ``size`` (height, width) to ``height`` × ``width`` shrinks (or keeps) both
    sides: the pipeline's resizes use the area filter (box) then, bilinear otherwise."""
    return height <= size[0] and width <= size[1]


def resize_like_host(image: Tensor, height: int, width: int) -> Tensor:
    """:func:`resize` with the filter :func:`inference.pipeline.resize_rgb` picks: box to shrink,
    bilinear to enlarge; the same bytes as that function on the host."""
    kind: Filter = "box" if shrinks((image.shape[-2], image.shape[-1]), height, width) else "bilinear"
    return resize(image, height, width, kind)


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
