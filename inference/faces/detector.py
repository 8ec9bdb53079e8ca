"""The face detector interface, and the registry that builds detectors by name.

A detector is anything with a :attr:`~FaceDetector.device` and a :meth:`~FaceDetector.detect` that
returns :class:`DetectedFace` objects (:class:`FaceDetector`). :func:`create_detector` builds one from
the factory registered under a name with :func:`register_detector`. MTCNN
(:mod:`inference.faces.mtcnn`) registers itself as ``"mtcnn"`` when imported, and importing
:mod:`inference.faces` imports it, so that name is always there.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from inference.errors import ToonserveError


class FaceDetectorError(ToonserveError):
    """A face detector could not be built: weights missing or unreadable, bad options, unknown name."""


#: The five landmarks, in the order of :attr:`DetectedFace.landmarks` rows ("left" = image-left).
LANDMARK_NAMES: Final = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")


@dataclass(frozen=True, eq=False)
class DetectedFace:
    """One detected face, in the pixel coordinates of the image handed to the detector.

    box: ``(x1, y1, x2, y2)``, floats, clipped to ``[0, W - 1] × [0, H - 1]``.
    score: face probability of the last stage, in (threshold, 1].
    landmarks: (5, 2) float32 ``(x, y)`` rows in :data:`LANDMARK_NAMES` order, read-only; not clipped.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray


@runtime_checkable
class FaceDetector(Protocol):
    """What the pipeline needs from a face detector; :func:`create_detector` builds one by name."""

    @property
    def device(self) -> torch.device:
        """Where the detector runs; :meth:`detect` moves its input there."""
        ...

    def detect(self, image: Tensor | np.ndarray) -> list[DetectedFace]:
        """Faces in ``image``, best score first.

        image: (3, H, W) uint8 RGB tensor (ideally already on :attr:`device`), or an (H, W, 3) uint8
        RGB numpy array.
        """
        ...


#: Builds a detector from ``(device, dtype, **options)``; the option ``smallest_face`` (pixels), when
#: given, is the smallest face side worth finding: a detector may skip the work that only finds smaller.
DetectorFactory = Callable[..., FaceDetector]

#: Factories by name. ``"mtcnn"`` is added by :mod:`inference.faces.mtcnn.detector` on import.
_REGISTRY: dict[str, DetectorFactory] = {}


def register_detector(name: str, factory: DetectorFactory) -> None:
    """Make ``factory`` available to :func:`create_detector` as ``name`` (replacing any previous one)."""
    _REGISTRY[name] = factory


def available_detectors() -> tuple[str, ...]:
    """Names :func:`create_detector` accepts."""
    return tuple(sorted(_REGISTRY))


def create_detector(
    name: str = "mtcnn",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    smallest_face: float | None = None,
    **options: Any,
) -> FaceDetector:
    """Build the detector registered as ``name`` on ``device``.

    ``smallest_face``: the smallest face side (pixels) the caller will use; smaller faces may be
    missed, which makes detection cheaper (for MTCNN it sets the pyramid floor, unless
    ``pyramid_floor`` is given).

    For "mtcnn", ``options`` are :class:`~inference.faces.mtcnn.detector.MTCNNConfig` fields (such as
    ``pyramid_floor``) plus ``weights_dir`` (a folder holding ``pnet.lz4``, ``rnet.lz4``, ``onet.lz4``;
    default: the installed ``mtcnn`` package's).
    Raises :class:`FaceDetectorError` for an unknown name or option, or unreadable weights.
    """
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise FaceDetectorError(
            f"unknown face detector '{name}'; available: {', '.join(available_detectors())}"
        ) from None
    if smallest_face is not None:
        options["smallest_face"] = smallest_face
    return factory(device, dtype, **options)
