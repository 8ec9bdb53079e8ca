"""The reference engine: ModelScope's own ``ImageCartoonPipeline`` behind :class:`Cartoonizer`'s interface.

For users who want upstream's behaviour bit for bit (its TensorFlow graphs, its facelib detector
and landmarks, its cv2 warps), at upstream's speed. It needs the ``reference`` extra
(``pip install 'toonserve[reference]'``: TensorFlow, OpenCV and ModelScope's pipeline dependencies)
and the complete model directory, ``detector.pb`` and ``keypoints.pb`` included (``toonserve
download STYLE --all``). Nothing here is imported by the service unless asked for.

What the adapter adds to upstream, so that results are interchangeable with ours: RGB uint8 out
(upstream returns BGR, float32 when a face was pasted), the output resized to the requested size
(upstream leaves a face-less result at the processing size) and ``strength``. Upstream reports no
faces, so ``faces`` is empty, and only the ``background`` no-face policy and the processing size
720 can be honoured.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import numpy as np

from inference.constants import DEFAULT_PROCESSING_SIZE
from inference.demo import is_demo_dir
from inference.errors import OptionsError, ToonserveError
from inference.geometry import processing_shape, resize_rgb, to_rgb_array
from inference.pipeline import Options, Result
from inference.weights import WeightsKind

#: What ModelScope's pipeline opens from the model directory (docs/model.md §1).
REQUIRED_FILES: Final = (
    "cartoon_h.pb",
    "cartoon_bg.pb",
    "alpha.jpg",
    "detector.pb",
    "keypoints.pb",
    "configuration.json",
)


class ReferenceEngineError(ToonserveError):
    """The reference engine cannot run here (missing extra or model files)."""


def _modelscope_pipeline(model_dir: Path) -> Callable[[np.ndarray], dict[str, Any]]:
    try:
        from modelscope.pipelines import pipeline
        from modelscope.utils.constant import Tasks
    except ImportError as exc:
        raise ReferenceEngineError(
            f"the reference engine needs ModelScope's pipeline dependencies ({exc}); "
            "install them with: pip install 'toonserve[reference]'"
        ) from exc
    run: Callable[[np.ndarray], dict[str, Any]] = pipeline(
        Tasks.image_portrait_stylization, model=str(model_dir)
    )
    return run


class ModelScopeEngine:
    """``run(image, options) -> Result`` with ModelScope's pipeline doing the work.

    ``pipeline_factory`` builds the upstream callable from the model directory (default: ModelScope's
    ``pipeline(Tasks.image_portrait_stylization, model=dir)``); it maps a BGR uint8 array to
    ``{"output_img": BGR array}``.
    """

    def __init__(
        self,
        model_dir: Path,
        style: str = "anime",
        pipeline_factory: Callable[[Path], Callable[[np.ndarray], dict[str, Any]]] = _modelscope_pipeline,
    ) -> None:
        missing = [name for name in REQUIRED_FILES if not (model_dir / name).is_file()]
        if missing:
            raise ReferenceEngineError(
                f"{model_dir} lacks {', '.join(missing)}; the reference engine needs the complete ModelScope "
                f"directory (toonserve download {style} --all)"
            )
        self.style = style
        self.weights: WeightsKind = "demo" if is_demo_dir(model_dir) else "modelscope"
        self._pipeline = pipeline_factory(model_dir)

    def run(self, image: np.ndarray, options: Options | None = None) -> Result:
        opts = options or Options()
        if opts.processing_size != DEFAULT_PROCESSING_SIZE or opts.no_face != "background":
            raise OptionsError(
                "the reference engine runs upstream as is: processing_size 720, no_face=background"
            )
        rgb = to_rgb_array(image)
        start = time.perf_counter()
        # ModelScope reads a numpy input as BGR and flips it to RGB itself.
        out = self._pipeline(np.ascontiguousarray(rgb[:, :, ::-1]))["output_img"]
        elapsed = (time.perf_counter() - start) * 1000
        cartoon = np.clip(np.asarray(out, dtype=np.float32), 0, 255)[:, :, ::-1]
        h, w = rgb.shape[:2]
        if cartoon.shape[:2] != (h, w):
            cartoon = resize_rgb(np.rint(cartoon).astype(np.uint8), h, w).astype(np.float32)
        if opts.strength < 1.0:
            cartoon = opts.strength * cartoon + (1.0 - opts.strength) * rgb.astype(np.float32)
        result = np.rint(cartoon).astype(np.uint8)
        oh, ow = opts.output_size or (h, w)
        result = np.ascontiguousarray(resize_rgb(result, oh, ow))
        return Result(
            image=result,
            style=self.style,
            faces=[],
            input_size=(h, w),
            processing_size=processing_shape(h, w, DEFAULT_PROCESSING_SIZE),
            output_size=(oh, ow),
            device="cpu",
            dtype="float32",
            no_face=None,
            weights=self.weights,
            timings_ms={"modelscope_pipeline": round(elapsed, 3)},
        )
