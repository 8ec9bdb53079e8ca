"""Faces followed across frames: the One Euro filter, tracks that keep their ids, come back and reset."""

from __future__ import annotations

import numpy as np
import pytest

from devkit import photos
from inference.faces import DetectedFace
from inference.pipeline import Cartoonizer, Options
from inference.tracking import FaceTracker, OneEuroFilter

FPS = 25.0


def _face(x: float, y: float, size: float = 100.0, jitter: np.ndarray | None = None) -> DetectedFace:
    points = np.array(
        [[x + 30, y + 40], [x + 70, y + 40], [x + 50, y + 60], [x + 35, y + 80], [x + 65, y + 80]], np.float32
    )
    if jitter is not None:
        points = points + jitter.astype(np.float32)
    return DetectedFace(box=(x, y, x + size, y + size), score=0.99, landmarks=points)


def test_the_filter_holds_a_still_value_and_follows_a_moving_one() -> None:
    rng = np.random.default_rng(0)
    still = OneEuroFilter()
    raw = 10 + rng.normal(0, 0.05, 200)
    out = np.array([still(np.array([v]), i / FPS)[0] for i, v in enumerate(raw)])
    assert out[0] == raw[0]  # the first sample passes as it is
    assert np.abs(np.diff(out[50:])).mean() < 0.3 * np.abs(np.diff(raw[50:])).mean()
    moving = OneEuroFilter()
    ramp = np.arange(100) * 0.02  # 0.5 units a second
    followed = np.array([moving(np.array([v]), i / FPS)[0] for i, v in enumerate(ramp)])
    assert abs(followed[-1] - ramp[-1]) < 0.05  # a lag of a tenth of a second at most
    with pytest.raises(ValueError):
        OneEuroFilter(min_cutoff_hz=0)


def test_faces_keep_their_tracks_and_come_back() -> None:
    tracker = FaceTracker(max_missing_s=0.5)
    left, right = _face(10, 10), _face(300, 10)
    first = tracker.update([left, right], 0.0)
    ids = [track for track, _ in first]
    assert len(set(ids)) == 2
    # Given in the other order and moved a little: the same tracks, in the order given.
    second = tracker.update([_face(305, 12), _face(14, 10)], 1 / FPS)
    assert [track for track, _ in second] == ids[::-1]
    # The left face is missed for a few frames, then comes back near where it was: the same track.
    for i in range(2, 8):
        tracker.update([_face(305, 12)], i / FPS)
    back = tracker.update([_face(305, 12), _face(16, 11)], 8 / FPS)
    assert [track for track, _ in back] == ids[::-1]
    # Gone for longer than max_missing_s: a new track.
    for i in range(9, 30):
        tracker.update([_face(305, 12)], i / FPS)
    late = tracker.update([_face(305, 12), _face(16, 11)], 30 / FPS)
    assert late[0][0] == ids[1] and late[1][0] not in ids
    # A frame of the next shot (a cut) forgets everything; so does reset().
    cut = tracker.update([_face(305, 12)], 31 / FPS, shot=1)
    assert cut[0][0] not in ids and tracker.track_ids == [cut[0][0]]
    tracker.reset()
    assert tracker.track_ids == []
    assert tracker.update([left], 32 / FPS, shot=1)[0][0] not in {*ids, cut[0][0]}


def test_a_still_faces_landmarks_are_smoothed() -> None:
    rng = np.random.default_rng(1)
    tracker = FaceTracker()
    raw, smooth = [], []
    for i in range(100):
        face = _face(50, 50, jitter=rng.normal(0, 1.0, (5, 2)))
        raw.append(face.landmarks)
        ((_, out),) = tracker.update([face], i / FPS)
        smooth.append(out.landmarks)
        assert not out.landmarks.flags.writeable and out.landmarks.dtype == np.float32
    step_raw = np.abs(np.diff(np.stack(raw)[20:], axis=0)).mean()
    step_smooth = np.abs(np.diff(np.stack(smooth)[20:], axis=0)).mean()
    assert step_smooth < 0.3 * step_raw


def test_the_pipeline_hands_its_faces_to_the_clips_tracker(cartoonizer: Cartoonizer) -> None:
    frame = photos.astronaut()
    tracker = FaceTracker()
    first = cartoonizer.run(frame, Options(processing_size=256, tracker=tracker, time_s=0.0))
    assert len(tracker.track_ids) == len(first.faces) == 1
    second = cartoonizer.run(frame, Options(processing_size=256, tracker=tracker, time_s=1 / FPS))
    assert tracker.track_ids == [0] and second.faces == first.faces  # the same frame: the same face
