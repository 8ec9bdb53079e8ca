"""What an image costs the device worker, in seconds: a fixed part per image plus a part per pixel.

The worker's time for one image is close to ``per_image + per_pixel × pixels``, where ``pixels`` is
the area the background network runs on (the processing size padded to a multiple of 16; see
:func:`cost_pixels`). The fixed part (face detection's pyramid floor, Python and kernel-launch
overhead, the output resize) dominates small images; the per-pixel part dominates photos.

The two are fitted on the worker's recent measurements with the Theil–Sen estimator (Sen 1968): the
slope is the median of the slopes between pairs of images of clearly different sizes (two small
images mostly measure noise in the fixed part, so a pair counts only when the larger image has at
least as many pixels more as cost what the fixed part does), the intercept the median of what is
left. It shrugs off a good share of odd measurements (a photo
with ten faces, a batch that waited on a page fault), and it needs images of *several* sizes to
tell the two parts apart. So it never learns a price per pixel from tiny images alone: a 1×1 PNG
that takes 20 ms is a 20 ms image, not 20 ms a pixel (dividing time by pixels once made every later
photo look like 1000 s of work, and every request was refused until a restart).

Two anchors measured before the service is ready (:meth:`CostModel.calibrate`: a small and a large
image through the whole pipeline) always take part in the fit, each counting as
:data:`ANCHOR_WEIGHT` measurements, so there is a spread of sizes from the start and a few odd
measurements cannot outvote them; and the fitted values stay within :data:`BOUND_FACTOR` of the
anchors' line, so no run of measurements, however odd, can push an estimate out of a sane range.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Final

import numpy as np

from inference.geometry import upstream_pad16

#: Before anything was measured: 50 ms an image, plus 1 s per million pixels (about what a float32
#: pass takes on two CPU cores). Replaced by the anchors at warm-up.
INITIAL_PER_IMAGE_S: Final = 0.05
INITIAL_PER_PIXEL_S: Final = 1e-6
#: Recent measurements kept for the fit (per-image averages of the worker's batches).
WINDOW: Final = 64
#: Each anchor counts as this many measurements: a few odd ones cannot outvote them, a window of
#: consistent ones on a device that has become slower can.
ANCHOR_WEIGHT: Final = 8.0
#: Two sizes count as "clearly different" for a slope when the larger is at least this many times
#: the smaller (closer pairs mostly measure noise).
MIN_SPREAD: Final = 1.5
#: The fit stays within this factor of the anchors' line: per-pixel in [b/F, b·F], per-image in
#: [0, a·F + FLOOR_S].
BOUND_FACTOR: Final = 8.0
#: Slack on the per-image bound, for devices where the anchors' fixed part is near zero.
FLOOR_S: Final = 0.25


def cost_pixels(height: int, width: int) -> int:
    """The pixels an image of this processing size costs: its area padded as the background pass
    pads it (both sides to the next multiple of 16 when either is off), so a 1×1 image costs 256."""
    h, w = upstream_pad16(max(1, height), max(1, width))
    return h * w


@dataclass(frozen=True)
class Estimate:
    """The fitted line: seconds = ``per_image_s + per_pixel_s × pixels``."""

    per_image_s: float
    per_pixel_s: float

    def seconds(self, pixels: int, images: int = 1) -> float:
        return images * self.per_image_s + pixels * self.per_pixel_s


class CostModel:
    """Thread-safe; the worker :meth:`observe`\\ s, admission asks :meth:`seconds` (module docstring)."""

    def __init__(
        self,
        per_image_s: float = INITIAL_PER_IMAGE_S,
        per_pixel_s: float = INITIAL_PER_PIXEL_S,
        window: int = WINDOW,
    ) -> None:
        if per_image_s < 0 or per_pixel_s <= 0 or window < 2:
            raise ValueError("per_image_s must be >= 0, per_pixel_s > 0, window >= 2")
        self._lock = threading.Lock()
        self._prior = Estimate(per_image_s, per_pixel_s)
        self._anchors: list[tuple[float, float]] = []
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._estimate = self._prior

    @property
    def estimate(self) -> Estimate:
        return self._estimate

    @property
    def measurements(self) -> int:
        """Recent measurements taking part in the fit (the anchors not counted)."""
        return len(self._recent)

    @property
    def calibrated(self) -> bool:
        """Whether the anchors were measured (:meth:`calibrate`)."""
        return bool(self._anchors)

    def seconds(self, pixels: int, images: int = 1) -> float:
        """Estimated worker seconds for ``images`` images of ``pixels`` cost pixels in all."""
        return self._estimate.seconds(pixels, images)

    def calibrate(self, small: tuple[int, float], large: tuple[int, float]) -> None:
        """Set the anchors, ``(cost pixels, seconds)`` of a small and a large image measured alone; the
        line through them becomes the reference the fit is bounded by."""
        (p0, t0), (p1, t1) = sorted((small, large))
        if p1 < MIN_SPREAD * p0:
            raise ValueError(f"anchors of {p0} and {p1} pixels are too close to tell the parts apart")
        slope = max((t1 - t0) / (p1 - p0), 1e-12)
        with self._lock:
            self._prior = Estimate(max(0.0, t0 - slope * p0), slope)
            self._anchors = [(float(p0), t0), (float(p1), t1)]
            self._estimate = self._fit()

    def observe(self, images: int, pixels: int, seconds: float) -> None:
        """The worker ran ``images`` images of ``pixels`` cost pixels in all in ``seconds``."""
        if images < 1 or pixels < 1 or not seconds > 0:
            return
        with self._lock:
            self._recent.append((pixels / images, seconds / images))
            self._estimate = self._fit()

    def _fit(self) -> Estimate:
        points = np.array([*self._anchors, *self._recent], dtype=np.float64).reshape(-1, 2)
        weights = np.array([ANCHOR_WEIGHT] * len(self._anchors) + [1.0] * len(self._recent))
        prior = self._prior
        slope = prior.per_pixel_s
        if len(points) >= 2:
            x, y = points[:, 0], points[:, 1]
            i, j = np.triu_indices(len(points), k=1)
            lo, hi = np.minimum(x[i], x[j]), np.maximum(x[i], x[j])
            # Pairs whose sizes differ enough for the per-pixel part to show through the fixed part's
            # noise: by a factor, and by at least the pixels that cost as much as the fixed part.
            apart = (hi >= MIN_SPREAD * lo) & (hi - lo >= prior.per_image_s / prior.per_pixel_s)
            if apart.any():
                i, j = i[apart], j[apart]
                slope = _weighted_median((y[j] - y[i]) / (x[j] - x[i]), weights[i] * weights[j])
        slope = min(max(slope, prior.per_pixel_s / BOUND_FACTOR), prior.per_pixel_s * BOUND_FACTOR)
        if len(points):
            intercept = _weighted_median(points[:, 1] - slope * points[:, 0], weights)
        else:
            intercept = prior.per_image_s
        intercept = min(max(intercept, 0.0), prior.per_image_s * BOUND_FACTOR + FLOOR_S)
        return Estimate(intercept, slope)


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    """The value below which half the total weight lies."""
    order = np.argsort(values)
    cumulative = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cumulative, cumulative[-1] / 2)])
