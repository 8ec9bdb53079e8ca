"""Faces followed across the frames of a clip, their landmarks smoothed over time, so the aligned head
crop does not jitter from frame to frame.

A detector run on each frame on its own finds a face's five points a pixel or two apart from one
frame to the next even when the person stands still (sensor noise, compression), and the head crop
the alignment makes from them moves with them: the stylised head then shimmers, its eyes jitter.
:class:`FaceTracker` takes each frame's detections in order and hands back the same faces with their
box and landmarks filtered:

* **tracks**: a detection continues the track whose last box it overlaps most (intersection over
  union at least ``match_iou``, or its centre within half the track's box size), one detection per
  track, best matches first; an unmatched detection starts a track;
* **coming back**: a track that finds no detection is kept for ``max_missing_s``; a face that
  reappears near where it was within that time continues it (the same track, its filter state
  kept), so a blink of the detector or a hand passing in front does not restart the smoothing;
* **smoothing**: each track's box and landmarks go through a One Euro filter (Casiez, Roussel and
  Vogel, CHI 2012): a low-pass filter whose cut-off frequency rises with the speed of the signal,
  so a still face is held steady (low cut-off: the noise is averaged away) and a moving one is
  followed without lag (high cut-off). Positions are measured in units of the face's size, so the
  same parameters hold for a face of 60 pixels and one of 600;
* **cuts**: a frame of another shot than the last one (the ``shot`` number the caller gives each
  frame, counting cuts) or :meth:`FaceTracker.reset` forgets every track: nothing of the previous
  shot carries over.

Synchronous and deterministic: the frames must come in order, one :meth:`FaceTracker.update` each.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

import numpy as np

from inference.faces import DetectedFace

#: One Euro parameters, in face sizes and seconds. Chosen on clips of a still and a panning face
#: with sensor noise (σ 4 levels; bench/steady.py's clips, MTCNN's landmarks): the frame-to-frame
#: movement of a still face's points drops from 0.84 to 0.14 pixels, that of a face panning at
#: 75 pixels a second (after the true motion is taken out) from 1.21 to 0.34, which then trails by
#: 3 pixels. A trailing crop is harmless: it frames the face a little differently, but the head is
#: pasted back through the same transform it was cut with, so it lands on the face.
DEFAULT_MIN_CUTOFF_HZ: Final = 1.0
DEFAULT_BETA: Final = 4.0
DEFAULT_D_CUTOFF_HZ: Final = 1.0
#: How long a face may go unseen and still come back as the same track.
DEFAULT_MAX_MISSING_S: Final = 1.0
#: Least overlap (intersection over union) for a detection to continue a track.
DEFAULT_MATCH_IOU: Final = 0.3


def _alpha(cutoff_hz: float, dt: float) -> float:
    """The exponential smoothing factor of a first-order low-pass filter at ``cutoff_hz``."""
    tau = 1.0 / (2.0 * math.pi * cutoff_hz)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """The One Euro filter over an array of values (module docstring), updated once per sample."""

    def __init__(
        self,
        min_cutoff_hz: float = DEFAULT_MIN_CUTOFF_HZ,
        beta: float = DEFAULT_BETA,
        d_cutoff_hz: float = DEFAULT_D_CUTOFF_HZ,
    ) -> None:
        if min_cutoff_hz <= 0 or d_cutoff_hz <= 0 or beta < 0:
            raise ValueError("the cut-off frequencies must be positive and beta not negative")
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.d_cutoff_hz = d_cutoff_hz
        self._value: np.ndarray | None = None
        self._speed: np.ndarray | None = None
        self._t: float | None = None

    def __call__(self, value: np.ndarray, t: float) -> np.ndarray:
        """The filtered ``value`` (any shape, float) sampled at ``t`` seconds (increasing)."""
        x = np.asarray(value, dtype=np.float64)
        if self._value is None or self._t is None or t <= self._t:
            self._value, self._speed, self._t = x.copy(), np.zeros_like(x), t
            return x.copy()
        dt = t - self._t
        assert self._speed is not None
        speed = (x - self._value) / dt
        a_d = _alpha(self.d_cutoff_hz, dt)
        self._speed = a_d * speed + (1 - a_d) * self._speed
        cutoff = self.min_cutoff_hz + self.beta * np.abs(self._speed)
        a = 1.0 / (1.0 + 1.0 / (2.0 * math.pi * cutoff * dt))
        self._value = a * x + (1 - a) * self._value
        self._t = t
        return self._value.copy()


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _size(box: tuple[float, float, float, float]) -> float:
    return max(1.0, math.sqrt(max(0.0, box[2] - box[0]) * max(0.0, box[3] - box[1])))


@dataclass
class _Track:
    id: int
    box: tuple[float, float, float, float]
    last_seen: float
    #: Box and landmarks together, in face sizes (the size the track had when it started).
    scale: float
    filter: OneEuroFilter = field(default_factory=OneEuroFilter)


class FaceTracker:
    """Faces followed from frame to frame with their landmarks smoothed (module docstring)."""

    def __init__(
        self,
        *,
        min_cutoff_hz: float = DEFAULT_MIN_CUTOFF_HZ,
        beta: float = DEFAULT_BETA,
        max_missing_s: float = DEFAULT_MAX_MISSING_S,
        match_iou: float = DEFAULT_MATCH_IOU,
    ) -> None:
        self.min_cutoff_hz = min_cutoff_hz
        self.beta = beta
        self.max_missing_s = max_missing_s
        self.match_iou = match_iou
        self._tracks: list[_Track] = []
        self._next_id = 0
        self._shot = 0

    @property
    def track_ids(self) -> list[int]:
        """The ids of the tracks alive now (seen within ``max_missing_s``)."""
        return [t.id for t in self._tracks]

    def reset(self) -> None:
        """Forget every track (a cut: nothing of the previous shot carries over)."""
        self._tracks.clear()

    def update(self, faces: list[DetectedFace], t: float, shot: int = 0) -> list[tuple[int, DetectedFace]]:
        """This frame's detections (at ``t`` seconds, in shot ``shot``; frames in order) → each with
        its track id and its box and landmarks smoothed, in the order given."""
        if shot != self._shot:
            self.reset()
            self._shot = shot
        self._tracks = [tr for tr in self._tracks if t - tr.last_seen <= self.max_missing_s]
        pairs = []
        for i, face in enumerate(faces):
            for k, track in enumerate(self._tracks):
                overlap = _iou(face.box, track.box)
                near = math.dist(_centre(face.box), _centre(track.box)) <= 0.5 * _size(track.box)
                if overlap >= self.match_iou or near:
                    pairs.append((overlap, -math.dist(_centre(face.box), _centre(track.box)), i, k))
        pairs.sort(reverse=True)
        assigned: dict[int, _Track] = {}
        taken: set[int] = set()
        for _, _, i, k in pairs:
            if i in assigned or k in taken:
                continue
            assigned[i] = self._tracks[k]
            taken.add(k)
        out = []
        for i, face in enumerate(faces):
            found = assigned.get(i)
            if found is None:
                track = _Track(
                    self._next_id,
                    face.box,
                    t,
                    _size(face.box),
                    OneEuroFilter(self.min_cutoff_hz, self.beta),
                )
                self._next_id += 1
                self._tracks.append(track)
            else:
                track = found
            values = np.concatenate([np.asarray(face.box, np.float64), face.landmarks.reshape(-1)])
            smooth = track.filter(values / track.scale, t) * track.scale
            box = (float(smooth[0]), float(smooth[1]), float(smooth[2]), float(smooth[3]))
            landmarks = smooth[4:].reshape(-1, 2).astype(np.float32)
            landmarks.flags.writeable = False
            track.box, track.last_seen = face.box, t
            out.append((track.id, DetectedFace(box=box, score=face.score, landmarks=landmarks)))
        return out


def _centre(box: tuple[float, float, float, float]) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2, (box[1] + box[3]) / 2)
