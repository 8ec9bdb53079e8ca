"""The image pyramid P-Net reads, as the ``mtcnn`` package (1.0) builds it, packed on one canvas.

The package's semantics, as reproduced here:

* the pyramid scales are ``(12 / pyramid_floor) · f^k`` for ``k < round(-(log(min(H, W) / 12) / log f)
  - 1)``. The count does not depend on ``pyramid_floor`` (the package's ``min_face_size``), so the last
  level can come out smaller than the 11 pixels P-Net needs: with f = 0.709, for ``pyramid_floor``
  above 22 (always above 31); with f = 0.8, even at 20. The package then fails inside TensorFlow and
  returns no face at all. We skip the levels that yield no P-Net cell and detect on the others.
  ``pyramid_floor`` is the pyramid's floor, not a filter: faces somewhat smaller are still found now
  and then, by both;
* each level is the TF ``AREA`` resize of the normalised image to ``trunc(H·s) × trunc(W·s)``.

Speed (see :func:`_pyramid_canvas` and :class:`~inference.faces.mtcnn.networks._PNet`): every pyramid
level is computed at once from one integral image (one ``grid_sample`` at all levels' pixel corners),
straight into a canvas where the levels are packed side by side, so P-Net runs as a single pass;
setting to ``-inf`` the pooling inputs that a level's last window reaches past its own map makes that
pass equal, cell for cell, to separate passes with TF "SAME" pooling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from inference.faces.mtcnn.networks import PIXEL_MEAN, PIXEL_SCALE, PNET_MIN_INPUT, PNET_WINDOW, _Rect

if TYPE_CHECKING:
    from inference.faces.mtcnn.detector import MTCNNConfig


def pyramid_scales(height: int, width: int, pyramid_floor: float, scale_factor: float) -> list[float]:
    """The package's pyramid scales for an image of ``height × width`` (some may be too small to use).

    ``(12 / pyramid_floor) · scale_factor^k`` for ``k < round(-(log(min(H, W) / 12) / log(f)) - 1)``.
    """
    count = int(np.round(-(np.log(min(height, width) / PNET_WINDOW) / np.log(scale_factor) + 1)))
    if count <= 0:
        return []
    scales = (PNET_WINDOW / pyramid_floor) * scale_factor ** np.arange(count)
    return [float(s) for s in scales]


def _pack(sizes: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Place rectangles (h, w), largest first, on one canvas at even offsets, without overlap.

    Greedy skyline (each rectangle goes where its top is highest, then leftmost), tried for a few
    canvas widths; the smallest canvas wins. Returns the (top, left) of each and the (even) canvas size.
    """
    even = [(h + h % 2, w + w % 2) for h, w in sizes]
    widest = max(w for _, w in even)
    widths = {widest} | {even[0][1] + w for _, w in even[1:4]}
    best: tuple[int, list[tuple[int, int]], tuple[int, int]] | None = None
    for width in sorted(widths):
        skyline = np.zeros(width // 2, dtype=np.int64)  # column tops, in units of 2 px
        offsets: list[tuple[int, int]] = []
        starts = {0}
        for h, w in even:
            cells = w // 2
            spots = [
                (int(skyline[x : x + cells].max()), x) for x in sorted(starts) if x + cells <= skyline.size
            ]
            top, x = min(spots)
            skyline[x : x + cells] = top + h // 2
            starts |= {x + cells}
            offsets.append((2 * top, 2 * x))
        canvas = (2 * int(skyline.max()), width)
        if best is None or canvas[0] * canvas[1] < best[0]:
            best = (canvas[0] * canvas[1], offsets, canvas)
    assert best is not None
    return best[1], best[2]


def _area_edges(in_size: int, out_size: int) -> np.ndarray:
    """Source coordinates ``i · in/out`` (float32, as TF's ``ResizeArea``) of the ``out + 1`` pixel
    edges of an area resize, clipped to ``in``."""
    ratio = np.float32(in_size) / np.float32(out_size)
    edges = np.arange(out_size + 1, dtype=np.float32) * ratio
    return np.asarray(np.minimum(edges, np.float32(in_size)), dtype=np.float32)


@dataclass(frozen=True)
class _Level:
    """One pyramid level: its scale, size, place on the canvas, and sampling coordinates."""

    scale: float
    height: int
    width: int
    top: int
    left: int
    #: The level's pixel edges as ``grid_sample`` coordinates into the integral image.
    grid_x: Tensor  # (width + 1,) float64
    grid_y: Tensor  # (height + 1,) float64
    #: ``out / in`` area ratio: TF divides each output's weighted sum by the source area it covers.
    density: float

    @property
    def cells(self) -> tuple[int, int]:
        """P-Net output size for this level: conv 3 → pool "SAME" /2 → conv 3 → conv 3."""
        return -(-(self.height - 2) // 2) - 4, -(-(self.width - 2) // 2) - 4

    def pool_overhang(self) -> list[_Rect]:
        """conv1-map rectangles that this level's last pooling row/column reaches past its own map.

        The conv1 map of a level is ``(h - 2) × (w - 2)``; when that is odd, TF pads the pooling
        with nothing that can win. On the packed canvas that row/column holds other pixels, so the
        detector sets it to ``-inf``.
        """
        rows, cols = self.height - 2, self.width - 2
        pooled_rows, pooled_cols = rows + rows % 2, cols + cols % 2
        out: list[_Rect] = []
        if rows % 2:
            out.append((self.top + rows, self.top + pooled_rows, self.left, self.left + pooled_cols))
        if cols % 2:
            out.append((self.top, self.top + pooled_rows, self.left + cols, self.left + pooled_cols))
        return out


@dataclass(frozen=True)
class _Pyramid:
    """The packed pyramid of one input size: levels, canvas, and the tensors that map P-Net cells back."""

    levels: tuple[_Level, ...]
    canvas: tuple[int, int]  # (Hc, Wc), even
    outside: tuple[_Rect, ...]  # conv1-map rectangles set to -inf before pooling
    cell_level: Tensor  # (Hc/2 - 5, Wc/2 - 5) int64: level of each P-Net cell, -1 for none
    origin: Tensor  # (L, 2) int64: each level's first cell (row, col) on the P-Net output map
    scale: Tensor  # (L,) float32


def _plan_pyramid(height: int, width: int, config: MTCNNConfig, device: torch.device) -> _Pyramid | None:
    sizes = []
    for s in pyramid_scales(height, width, config.pyramid_floor, config.scale_factor):
        # TF truncates the float target size (shape · scale) to int.
        h, w = int(height * s), int(width * s)
        if min(h, w) >= PNET_MIN_INPUT:
            sizes.append((s, h, w))
    if not sizes:
        return None
    # Each level's footprint keeps one spare row and column: the integral-image samples of a level
    # are its (h + 1) × (w + 1) pixel corners.
    offsets, canvas = _pack([(h + 1, w + 1) for _, h, w in sizes])
    levels = []
    for (s, h, w), (top, left) in zip(sizes, offsets, strict=True):
        # Sampling the inclusive integral image C at (edge - 1) reads the sum over [0, edge).
        gx = 2 * (_area_edges(width, w).astype(np.float64) - 1) / (width - 1) - 1
        gy = 2 * (_area_edges(height, h).astype(np.float64) - 1) / (height - 1) - 1
        density = 1.0 / (float(np.float32(height) / np.float32(h)) * float(np.float32(width) / np.float32(w)))
        grid_x = torch.from_numpy(gx).to(device)
        grid_y = torch.from_numpy(gy).to(device)
        levels.append(_Level(s, h, w, top, left, grid_x, grid_y, density))
    cell_level = torch.full((canvas[0] // 2 - 5, canvas[1] // 2 - 5), -1, dtype=torch.int64)
    for i, lv in enumerate(levels):
        ch, cw = lv.cells
        cell_level[lv.top // 2 : lv.top // 2 + ch, lv.left // 2 : lv.left // 2 + cw] = i
    return _Pyramid(
        levels=tuple(levels),
        canvas=canvas,
        outside=tuple(rect for lv in levels for rect in lv.pool_overhang()),
        cell_level=cell_level.to(device),
        origin=torch.tensor([[lv.top // 2, lv.left // 2] for lv in levels], dtype=torch.int64, device=device),
        scale=torch.tensor([lv.scale for lv in levels], dtype=torch.float32, device=device),
    )


#: Rows whose column sums of uint8 values stay exact in float32 (below 2^24).
_EXACT_FLOAT32_ROWS: Final = (1 << 24) // 255


def _pyramid_canvas(pixels: Tensor, plan: _Pyramid) -> Tensor:
    """Every level's TF ``AREA`` resize of ``pixels``, normalised, at its place on the packed canvas.

    pixels: (3, H, W) float32 RGB holding uint8 values. Returns (1, 3, Hc, Wc) float32 in about
    [-1, 1]; pixels between levels hold arbitrary values that no kept P-Net cell reads.

    An area resize averages the source over each output pixel's footprint, fractional edges included.
    With the integral image ``S`` that is ``(S(y1, x1) - S(y0, x1) - S(y1, x0) + S(y0, x0)) / area``,
    and ``S`` between integer points is exactly the bilinear interpolation of its values there; so one
    ``grid_sample`` at every level's pixel corners, then two differences, gives the whole pyramid.
    ``S`` is summed exactly (integers) and held in float64, whose 53 bits keep the differences within
    ~1e-7 of a grey level; TF itself sums in float32 and is off the exact average by up to ~5e-3.
    """
    height = pixels.shape[1]
    rows = pixels if height <= _EXACT_FLOAT32_ROWS else pixels.double()
    integral = rows.cumsum(1).double().cumsum(2)[None]  # (1, 3, H, W): inclusive sums over [0, y] × [0, x]
    hc, wc = plan.canvas
    grid = integral.new_full((1, hc + 1, wc + 1, 2), -2.0)  # outside [-1, 1]: reads 0
    for lv in plan.levels:
        block = grid[0, lv.top : lv.top + lv.height + 1, lv.left : lv.left + lv.width + 1]
        block[..., 0] = lv.grid_x
        block[..., 1] = lv.grid_y[:, None]
    # Zero padding supplies the empty sums at edge 0 (one before the first row/column of C).
    corners = F.grid_sample(integral, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    del integral, grid  # the big float64 buffers go before the next ones come
    for lv in plan.levels:
        # The normalisation's scale goes in here, while the values are still float64.
        corners[..., lv.top : lv.top + lv.height + 1, lv.left : lv.left + lv.width + 1] *= (
            lv.density / PIXEL_SCALE
        )
    return corners.diff(dim=3).diff(dim=2).float().sub_(PIXEL_MEAN / PIXEL_SCALE)
