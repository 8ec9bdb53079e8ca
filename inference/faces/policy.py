"""Which of the faces found are stylised, and why the others are not.

Upstream keeps the 10 largest detections and silently drops faces of 60 px or less; here every face
found is reported, and each one left out says why: ``below_threshold`` (the detector's score),
``too_small`` (its box side under the floor), ``over_limit`` (beyond the largest ``max_faces``).
"""

from __future__ import annotations

from collections.abc import Sequence

from inference.constants import SkipReason
from inference.faces.detector import DetectedFace
from inference.geometry import box_area


def choose_faces(
    found: Sequence[DetectedFace], min_score: float, min_size: float, max_faces: int
) -> tuple[list[int], dict[int, SkipReason]]:
    """The indices of the faces to stylise, largest first (upstream pastes the largest first), and
    the reason each other one is skipped."""
    eligible: list[int] = []
    reasons: dict[int, SkipReason] = {}
    for i, face in enumerate(found):
        x1, y1, x2, y2 = face.box
        if face.score < min_score:
            reasons[i] = "below_threshold"
        elif max(x2 - x1, y2 - y1) < min_size:
            reasons[i] = "too_small"
        else:
            eligible.append(i)
    eligible.sort(key=lambda i: box_area(found[i].box), reverse=True)
    reasons.update((i, "over_limit") for i in eligible[max_faces:])
    return eligible[:max_faces], reasons
