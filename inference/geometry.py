"""Image sizes and the resizes between them, as upstream does them: the processing size a photo is
brought to, the padding of the background pass, RGB arrays from any channel layout, and the resizes
on the host (OpenCV) and on the device (the same bytes).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from torch import Tensor

from inference.constants import BACKGROUND_MULTIPLE
from inference.device_image import resize_array, resize_like_host
from inference.errors import OptionsError


def box_area(box: tuple[float, float, float, float]) -> float:
    """Area of an ``(x1, y1, x2, y2)`` box; faces are ordered by it, largest first, as upstream does."""
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


#: Rows composited over white at once by :func:`to_rgb_array`.
_COMPOSITE_ROWS: Final = 256


def to_rgb_array(image: np.ndarray) -> np.ndarray:
    """Any uint8 image array → (H, W, 3) uint8 RGB.

    (H, W) and (H, W, 1) grey are repeated to three channels; (H, W, 2) grey+alpha and (H, W, 4) RGBA
    are composited over white, so transparent areas come out white rather than black.
    """
    if image.dtype != np.uint8:
        raise OptionsError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4) or min(image.shape[:2]) < 1:
        raise OptionsError(f"image must be (H, W), (H, W, 1|2|3|4), got {image.shape}")
    channels = image.shape[2]
    if channels in (2, 4):
        out = np.empty((*image.shape[:2], channels - 1), np.uint8)
        # A band of rows at a time: the float temporaries of a 40 MP image at once would take 1.6 GB.
        for top in range(0, image.shape[0], _COMPOSITE_ROWS):
            band = image[top : top + _COMPOSITE_ROWS]
            colour = band[:, :, :-1].astype(np.float32)
            alpha = band[:, :, -1:].astype(np.float32) / 255.0
            out[top : top + _COMPOSITE_ROWS] = np.rint(colour * alpha + 255.0 * (1.0 - alpha))
        image = out
        channels -= 1
    if channels == 1:
        image = np.repeat(image, 3, axis=2)
    return np.ascontiguousarray(image)


def processing_shape(height: int, width: int, size: int, max_pixels: int | None = None) -> tuple[int, int]:
    """Upstream's ``resize_size``: short side → ``size`` if larger, the long side scaled and truncated;
    then, if the area is over ``max_pixels``, both sides shrunk by the same factor (truncated) until it
    fits, so no aspect ratio buys more model work than the budget (a 40000×1000 strip becomes about
    9700×242 under 1536²)."""
    short = min(height, width)
    if short > size:
        if height <= width:
            height, width = size, int(size * width / height)
        else:
            height, width = int(size * height / width), size
    if max_pixels is not None and height * width > max_pixels:
        scale = math.sqrt(max_pixels / (height * width))
        height, width = max(1, int(height * scale)), max(1, int(width * scale))
    return height, width


def resize_rgb(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 → (height, width, 3) uint8 with OpenCV's ``cv2.resize``, as upstream resizes:
    the area filter (``INTER_AREA``: each output pixel the mean of the source area it covers) where
    a side shrinks, bilinear (``INTER_LINEAR``) where a side grows; a side that shrinks while the
    other grows is resized first, on its own (:func:`inference.device_image.resize_steps`). The
    array itself when it has that size already."""
    return resize_array(rgb, height, width)


def upstream_pad16(height: int, width: int) -> tuple[int, int]:
    """The padded size of upstream's ``padTo16x`` (both sides grow if either is not a multiple of 16)."""
    m = BACKGROUND_MULTIPLE
    if height % m or width % m:
        return (height // m + 1) * m, (width // m + 1) * m
    return height, width


def resize_out_on_device(
    image: Tensor, height: int, width: int, keep: bool
) -> tuple[np.ndarray, Tensor | None]:
    """The result (3, h, w) uint8 RGB on the device → (height, width, 3) on the host, resized on the
    device first with the bytes :func:`resize_rgb` gives on the host, then copied back once; and,
    if ``keep``, the resized (3, height, width) tensor left on the device."""
    sized = resize_like_host(image, height, width).contiguous()
    host = sized.permute(1, 2, 0).contiguous().cpu().numpy()  # the one device → host copy
    return host, sized if keep else None
