"""Face detection, on the model's device: the interface the pipeline uses, and MTCNN behind it.

The pipeline needs, per face, a box, a score and five landmarks (eye centres, nose tip, mouth corners)
to align head crops (docs/architecture.md). What lives where:

* :mod:`inference.faces.detector`: that interface and the registry of detectors by name:
  :class:`DetectedFace`, :class:`FaceDetector`, :data:`LANDMARK_NAMES`, :class:`FaceDetectorError`,
  :func:`create_detector`, :func:`register_detector`, :func:`available_detectors`;
* :mod:`inference.faces.mtcnn`: MTCNN in torch with the weights of the ``mtcnn`` PyPI package,
  registered as ``"mtcnn"`` (importing this package imports it): ``weights`` reads the weight files
  as numpy data only, ``networks`` holds P-Net, R-Net and O-Net, ``pyramid`` the packed image pyramid,
  ``geometry`` NMS, box arithmetic and crops, ``detector`` :class:`MTCNNConfig` and
  :class:`MTCNNDetector`.
"""

from inference.faces.detector import (
    LANDMARK_NAMES,
    DetectedFace,
    DetectorFactory,
    FaceDetector,
    FaceDetectorError,
    available_detectors,
    create_detector,
    register_detector,
)
from inference.faces.mtcnn import (
    MTCNNConfig,
    MTCNNDetector,
    crop_and_resize,
    nms_keep,
    package_weights_dir,
    pyramid_scales,
    read_numpy_pickle,
)

__all__ = [
    "LANDMARK_NAMES",
    "DetectedFace",
    "DetectorFactory",
    "FaceDetector",
    "FaceDetectorError",
    "MTCNNConfig",
    "MTCNNDetector",
    "available_detectors",
    "create_detector",
    "crop_and_resize",
    "nms_keep",
    "package_weights_dir",
    "pyramid_scales",
    "read_numpy_pickle",
    "register_detector",
]
