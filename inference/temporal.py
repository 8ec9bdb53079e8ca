"""Consecutive cartoon frames that agree where the input frames agree.

Cartoonized one by one, the frames of a clip flicker: a generator amplifies the small differences
between two frames of the same scene (sensor noise, compression) into visibly different strokes and
colours, even where nothing moved. :class:`Steadier` blends each frame's cartoon with the previous
*output* warped to where its pixels are now, following the motion of the input frames:

1. the optical flow from this input frame back to the previous one (OpenCV's DIS, Kroeger et al.
   2016), on grey copies;
2. where that flow can be trusted: its forward-backward check (following the flow back and then the
   flow from the previous frame forward again must return within half a pixel plus a twentieth of
   the motion, Sundaram et al. 2010), and the warped previous *input* matching this input within
   ``photo_tolerance`` levels (what a disocclusion, a reflection or a change of light fails);
3. there, ``out = (1 - w)·cartoon + w·warped previous output``; elsewhere the cartoon as it is. The
   weight's edge is feathered so no seam shows.

Along a trajectory that is an exponential moving average of the cartoons: frame-to-frame flicker
drops (white flicker by √((1 - w)/(1 + w)), 0.42 at w = 0.7) while a change that lasts reaches the
output within a few frames; where motion is wrong or new, nothing is blended and nothing ghosts.
A cut (:func:`is_cut`) or :meth:`Steadier.reset` starts afresh.

:func:`warping_error` is how video temporal-consistency papers (Lai et al. 2018; Bonneel et al.
2015) measure flicker: the mean absolute difference between each output frame and the previous one
warped by the motion, where the motion is valid.

Images are (h, w, 3) uint8 RGB host arrays, all frames of one clip of one size. Synchronous.
"""

from __future__ import annotations

from typing import Final

import cv2
import numpy as np

#: The previous output's share where the motion is trusted. Chosen on the bench clips
#: (bench/video.py): the flicker of a panning shot drops to about half while every frame stays
#: within a level or two (mean) of its own cartoon.
DEFAULT_WEIGHT: Final = 0.7
#: How far (levels, mean over RGB) the warped previous input may differ from this one and the motion
#: still be trusted: sensor noise of σ 4 makes about 6; a disocclusion, tens.
DEFAULT_PHOTO_TOLERANCE: Final = 14.0
#: Frames whose grey histograms differ by more than this (half the L1 distance, 0..1) are a cut.
DEFAULT_CUT_THRESHOLD: Final = 0.5
#: The flow is computed on grey copies whose short side is at most this, and scaled up: at 720×960
#: the two flows take a quarter of the time, and the motion of a cartoon's strokes is smooth enough
#: for it.
FLOW_SIDE: Final = 360


def _grey(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _sample_grid(flow: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return xs + flow[..., 0], ys + flow[..., 1]


def warp(image: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``image`` sampled at ``x + flow(x)`` (bilinear, edges replicated): the previous frame brought
    to where its pixels are in this one, for ``flow`` from this frame back to the previous one."""
    map_x, map_y = _sample_grid(flow)
    warped: np.ndarray = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return warped


def is_cut(previous: np.ndarray, current: np.ndarray, threshold: float = DEFAULT_CUT_THRESHOLD) -> bool:
    """Whether two consecutive frames belong to different shots: their grey-level histograms (32
    bins) differ by more than ``threshold`` (half their L1 distance, 0 = the same, 1 = disjoint)."""
    a = cv2.calcHist([_grey(previous)], [0], None, [32], [0, 256]).ravel()
    b = cv2.calcHist([_grey(current)], [0], None, [32], [0, 256]).ravel()
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum()) > threshold


#: Averages three channels (cv2.transform's matrix).
_MEAN_OF_3: Final = np.full((1, 3), 1 / 3, np.float32)
_SUM_OF_2: Final = np.ones((1, 2), np.float32)


def _squared_norm(field: np.ndarray) -> np.ndarray:
    """(h, w, 2) float32 → (h, w): each vector's squared length."""
    return np.asarray(cv2.transform(cv2.multiply(field, field), _SUM_OF_2))


class Steadier:
    """Each frame's cartoon blended with the previous output where the motion is trusted (module
    docstring). One per clip; frames in order."""

    def __init__(
        self,
        weight: float = DEFAULT_WEIGHT,
        photo_tolerance: float = DEFAULT_PHOTO_TOLERANCE,
        cut_threshold: float = DEFAULT_CUT_THRESHOLD,
    ) -> None:
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"weight must be in [0, 1), got {weight}")
        self.weight = weight
        self.photo_tolerance = photo_tolerance
        self.cut_threshold = cut_threshold
        self._flow = cv2.DISOpticalFlow.create(cv2.DISOPTICAL_FLOW_PRESET_FAST)
        self._back: np.ndarray = np.zeros((0, 0, 2), np.float32)
        self._photo: np.ndarray | None = None
        self._grey: np.ndarray | None = None
        self._out: np.ndarray | None = None
        #: The share of the last frame's pixels that were blended (0 at a start or a cut).
        self.blended = 0.0

    def reset(self) -> None:
        """Start afresh: the next frame is taken as it is."""
        self._photo = self._grey = self._out = None
        self.blended = 0.0

    def prime(self, photo: np.ndarray, output: np.ndarray) -> None:
        """Continue after a frame that was made elsewhere: its input ``photo`` and its ``output`` (a
        resumed clip's last frame written)."""
        self._photo, self._grey, self._out = photo, _grey(photo), output

    def __call__(self, photo: np.ndarray, cartoon: np.ndarray) -> np.ndarray:
        """The output frame for input ``photo`` whose frame-by-frame cartoon is ``cartoon``."""
        grey = _grey(photo)
        previous, prev_grey, prev_out = self._photo, self._grey, self._out
        out = cartoon
        self.blended = 0.0
        if (
            previous is not None
            and prev_grey is not None
            and prev_out is not None
            and self.weight > 0
            and previous.shape == photo.shape
            and not is_cut(previous, photo, self.cut_threshold)
        ):
            weight = self._trusted(grey, prev_grey, photo, previous) * self.weight
            self.blended = float((weight > 0).mean())
            warped = warp(prev_out, self._back)
            # cartoon × (1 − weight) + warped × weight, rounded (OpenCV's fused, threaded loop: a
            # fifth of NumPy's time at 720p; ties may round the other way, 1 level on 0.1 % of values).
            out = np.asarray(cv2.blendLinear(np.ascontiguousarray(cartoon), warped, 1 - weight, weight))
        self._photo, self._grey, self._out = photo, grey, out
        return out

    def _flows(self, grey: np.ndarray, prev_grey: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The flows from this frame back to the previous one and forward again, (h, w, 2) float32,
        computed at most :data:`FLOW_SIDE` on the short side and scaled up."""
        h, w = grey.shape
        scale = min(1.0, FLOW_SIDE / min(h, w))
        if scale < 1.0:
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            grey, prev_grey = (cv2.resize(g, size, interpolation=cv2.INTER_AREA) for g in (grey, prev_grey))
        sh, sw = grey.shape
        flows = []
        for a, b in ((grey, prev_grey), (prev_grey, grey)):
            flow = np.asarray(self._flow.calc(a, b, np.zeros((sh, sw, 2), np.float32)))
            if scale < 1.0:
                flow = np.asarray(cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR))
                flow[..., 0] *= w / sw
                flow[..., 1] *= h / sh
            flows.append(flow)
        return flows[0], flows[1]

    def _trusted(
        self, grey: np.ndarray, prev_grey: np.ndarray, photo: np.ndarray, previous: np.ndarray
    ) -> np.ndarray:
        """(h, w) float32 in [0, 1]: where the flow back to the previous frame holds (and keeps it as
        ``self._back`` for the warp)."""
        back, forward = self._flows(grey, prev_grey)
        self._back = back
        # Following the flow back, then the previous frame's flow forward, returns home.
        there = warp(forward, back)
        # |back + there|² < 0.01 (|back|² + |there|²) + 0.5, with OpenCV's threaded loops (the same
        # values as NumPy's, in a quarter of the time at 720p).
        round_trip = _squared_norm(cv2.add(back, there))
        motion = cv2.addWeighted(_squared_norm(back), 0.01, _squared_norm(there), 0.01, 0.5)
        consistent = round_trip < motion
        # The previous input, warped, looks like this one: the mean of the channels' differences.
        diff = cv2.transform(cv2.absdiff(warp(previous, back), photo).astype(np.float32), _MEAN_OF_3)
        trusted = (consistent & (diff < self.photo_tolerance)).astype(np.float32)
        # Feathered, so the blended and the unblended parts meet without a seam.
        return np.asarray(cv2.blur(trusted, (5, 5)))


def warping_error(frames: list[np.ndarray], flows: list[np.ndarray], valid: list[np.ndarray]) -> float:
    """Mean absolute difference (levels) between each frame and the previous one warped by the true
    motion, over the valid pixels: ``flows[i]`` and ``valid[i]`` belong to the step from frame ``i``
    to frame ``i + 1`` (flow from frame ``i + 1`` back to frame ``i``, (h, w, 2); valid (h, w) bool)."""
    total, count = 0.0, 0
    for i in range(len(frames) - 1):
        warped = warp(frames[i], flows[i]).astype(np.int16)
        diff = np.abs(frames[i + 1].astype(np.int16) - warped).mean(axis=2)
        total += float(diff[valid[i]].sum())
        count += int(valid[i].sum())
    return total / count if count else 0.0
