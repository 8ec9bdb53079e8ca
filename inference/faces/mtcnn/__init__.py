"""MTCNN (P-Net → R-Net → O-Net) in torch, with the weights of the ``mtcnn`` PyPI package.

MTCNN gives what the pipeline needs of a face detector (a box, a score, five landmarks), and its
trained weights ship inside the ``mtcnn`` package (``mtcnn/assets/weights/{pnet,rnet,onet}.lz4``).
That package runs them with TensorFlow, which we never import to serve, so this subpackage:

* finds the three files through the distribution's metadata and reads them as numpy data only
  (:mod:`~inference.faces.mtcnn.weights`);
* converts the Keras layout once into three torch networks (:mod:`~inference.faces.mtcnn.networks`);
* reproduces the package's detection semantics (version 1.0), so its own TF run is the parity
  reference in the tests: the packed image pyramid (:mod:`~inference.faces.mtcnn.pyramid`), NMS,
  box arithmetic and crops (:mod:`~inference.faces.mtcnn.geometry`), and the three stages put
  together (:mod:`~inference.faces.mtcnn.detector`: :class:`MTCNNConfig`, :class:`MTCNNDetector`,
  registered as ``"mtcnn"`` with :func:`inference.faces.register_detector`).
"""

from inference.faces.mtcnn.detector import MTCNNConfig, MTCNNDetector
from inference.faces.mtcnn.geometry import crop_and_resize, nms_keep
from inference.faces.mtcnn.pyramid import pyramid_scales
from inference.faces.mtcnn.weights import package_weights_dir, read_numpy_pickle

__all__ = [
    "MTCNNConfig",
    "MTCNNDetector",
    "crop_and_resize",
    "nms_keep",
    "package_weights_dir",
    "pyramid_scales",
    "read_numpy_pickle",
]
