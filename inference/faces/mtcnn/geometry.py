"""Box arithmetic for the MTCNN stages: the ``mtcnn`` package's (1.0) NMS, squaring, regression, crops.

The package's semantics, as reproduced here:

* NMS keeps a box unless *any* higher-scored box overlaps it above the threshold, suppressed or not
  (not the greedy variant); overlap is computed without the ``+1`` pixel convention;
* R-Net and O-Net read ``tf.image.crop_and_resize`` crops (24², 48²) of the normalised image: bilinear,
  box corners normalised by ``H``/``W`` but sampled on the ``(H - 1)``/``(W - 1)`` grid, samples
  outside the image read 0 (mid-grey); their regression is scaled by ``x2 - x1 + 1`` (here with the
  ``+1``).

Speed: the crops of a stage are one ``grid_sample`` call over all candidates, and NMS is a blocked,
vectorised mask.
"""

from __future__ import annotations

from typing import Final, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

#: Rows of NMS done at once (bounds the IoU block held in memory to this × candidates).
_NMS_BLOCK: Final = 1024

NmsMethod = Literal["union", "min"]


def nms_keep(
    boxes: Tensor, threshold: float, method: NmsMethod = "union", groups: Tensor | None = None
) -> Tensor:
    """Which boxes survive the package's NMS: a box goes if *any* earlier box overlaps it too much.

    boxes: (N, 4) float ``x1, y1, x2, y2``, best first. Overlap is ``inter / union`` ("union") or
    ``inter / min(area)`` ("min"), areas without the +1 pixel convention; too much is ``> threshold``.
    groups: optional (N,) ids; boxes of different groups never suppress each other.
    Returns an (N,) bool mask. Unlike greedy NMS, a suppressed box still suppresses those after it.
    """
    n = boxes.shape[0]
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    suppressed = torch.zeros(n, dtype=torch.bool, device=boxes.device)
    index = torch.arange(n, device=boxes.device)
    for start in range(0, n, _NMS_BLOCK):
        stop = min(start + _NMS_BLOCK, n)
        # Rows start..stop can only suppress columns after them.
        r, c = slice(start, stop), slice(start, n)
        iw = (torch.minimum(x2[r, None], x2[None, c]) - torch.maximum(x1[r, None], x1[None, c])).clamp_min(0)
        ih = (torch.minimum(y2[r, None], y2[None, c]) - torch.maximum(y1[r, None], y1[None, c])).clamp_min(0)
        inter = iw * ih
        if method == "union":
            denom = area[r, None] + area[None, c] - inter
        else:
            denom = torch.minimum(area[r, None], area[None, c])
        hit = (inter / denom > threshold) & (index[r, None] < index[None, c])
        if groups is not None:
            hit &= groups[r, None] == groups[None, c]
        suppressed[c] |= hit.any(0)
    return ~suppressed


def _square(boxes: Tensor) -> Tensor:
    """(N, 4+) boxes → squares of side ``max(w, h)`` about the same centre (no +1); extra columns kept."""
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = torch.maximum(w, h)
    x1 = boxes[:, 0] + 0.5 * (w - side)
    y1 = boxes[:, 1] + 0.5 * (h - side)
    return torch.cat([torch.stack([x1, y1, x1 + side, y1 + side], 1), boxes[:, 4:]], 1)


def _regress(boxes: Tensor, offsets: Tensor) -> Tensor:
    """Move (N, 4+) box corners by (N, 4) offsets in units of ``x2 - x1 + 1`` / ``y2 - y1 + 1``."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    moved = boxes[:, :4] + offsets * torch.stack([w, h, w, h], 1)
    return torch.cat([moved, boxes[:, 4:]], 1)


def crop_and_resize(image: Tensor, boxes: Tensor, size: int, extrapolation_value: float = 0.0) -> Tensor:
    """``tf.image.crop_and_resize`` of one image: bilinear ``size × size`` crops of every box.

    image: (C, H, W) float. boxes: (K, 4) float ``x1, y1, x2, y2`` in pixels. As the package calls TF,
    corners are normalised by ``W``/``H`` and sampled on the ``(W - 1)``/``(H - 1)`` grid: sample
    ``(i, j)`` sits at row ``(y1 + i·(y2 - y1)/(size - 1)) / H · (H - 1)``, and a sample row or column
    outside the image reads ``extrapolation_value``. Returns (K, C, size, size) in ``image``'s dtype,
    from one ``grid_sample`` call for all boxes.
    """
    c, height, width = image.shape
    k = boxes.shape[0]
    norm = boxes / boxes.new_tensor([width, height, width, height])
    steps = torch.arange(size, dtype=boxes.dtype, device=boxes.device) / (size - 1)
    xs = norm[:, 0:1] + steps * (norm[:, 2:3] - norm[:, 0:1])  # (K, size), in [0, 1] inside the image
    ys = norm[:, 1:2] + steps * (norm[:, 3:4] - norm[:, 1:2])
    grid = torch.stack([xs[:, None, :].expand(k, size, size), ys[:, :, None].expand(k, size, size)], -1)
    # All crops stacked along the grid's rows, so a single (1, C, H, W) image serves every box.
    crops = F.grid_sample(
        image[None], (grid * 2 - 1).reshape(1, k * size, size, 2).to(image.dtype), align_corners=True
    )
    crops = crops.reshape(c, k, size, size).transpose(0, 1)
    inside = ((ys >= 0) & (ys <= 1))[:, None, :, None] & ((xs >= 0) & (xs <= 1))[:, None, None, :]
    return crops.where(inside, extrapolation_value)
