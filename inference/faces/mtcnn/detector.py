"""The MTCNN face detector: its options, the three stages, and its factory (registered as ``"mtcnn"``).

It reproduces the detection semantics of the ``mtcnn`` package (version 1.0), so that package's own
TF run is the parity reference in the tests. They differ from the original MTCNN papers' code in
places, on purpose: parity is with what users of that package get. The pyramid's are in
:mod:`~inference.faces.mtcnn.pyramid`, those of NMS and crops in :mod:`~inference.faces.mtcnn.geometry`;
the stages put them together:

* pixels are normalised as ``(x - 127.5) / 128``;
* a P-Net cell ``(i, j)`` gives the box ``(2j + 1, 2i + 1, 2j + 12, 2i + 12)`` on its level (the
  one-based corners of the original MTCNN code: 11 pixels wide, not the 12 of the window), each
  corner moved by the regression times 11, then divided by the scale; cells with a face probability
  above the threshold are kept (strictly greater, as every threshold here);
* P-Net: NMS per level (0.5), then across levels (0.7), then each box is squared about its centre;
* R-Net and O-Net read 24² and 48² crops of the candidates; R-Net: threshold, NMS (0.7), square;
  O-Net: landmarks ``(x2 - x1 + 1) · l + x1 - 1`` (MATLAB's one-based origin, kept as is), threshold,
  NMS over the *smaller* area (0.7);
* the final boxes are clipped to ``[0, W - 1] × [0, H - 1]`` (the package's ``fit_to_image``);
  landmarks are not.

The networks run channels-last (which is what makes their 3-channel first convolutions fast on CPU).
Everything stays on the detector's device (CPU or CUDA) until the final, small transfer of the results.
"""

from __future__ import annotations

import copy
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from torch import Tensor, nn

from inference.errors import InputShapeError
from inference.faces.detector import DetectedFace, FaceDetectorError, register_detector
from inference.faces.mtcnn.geometry import _regress, _square, crop_and_resize, nms_keep
from inference.faces.mtcnn.networks import (
    ONET_SIZE,
    PIXEL_MEAN,
    PIXEL_SCALE,
    PNET_STRIDE,
    PNET_WINDOW,
    RNET_SIZE,
    _load_network,
)
from inference.faces.mtcnn.pyramid import _plan_pyramid, _Pyramid, _pyramid_canvas
from inference.faces.mtcnn.weights import MTCNN_WEIGHT_FILES, package_weights_dir

#: Pyramid layouts kept per detector (one per input size).
_LAYOUT_CACHE_SIZE: Final = 16


@dataclass(frozen=True)
class MTCNNConfig:
    """Detection parameters; the defaults are those of the ``mtcnn`` package (1.0).

    pyramid_floor: smallest face side in image pixels the pyramid reaches (its first scale is
        ``12 / pyramid_floor``); smaller faces are missed, values below 12 upsample the image. It is
        the ``mtcnn`` package's ``min_face_size`` argument, not the pipeline's
        ``Options.min_face_size`` (the smallest face box that gets stylised).
    scale_factor: ratio between successive pyramid levels, in (0, 1).
    threshold_pnet / threshold_rnet / threshold_onet: face probability a candidate must exceed at each
        stage.
    nms_pnet_level: IoU above which a P-Net box is dropped for a better one of the same level.
    nms_pnet: the same across all levels; nms_rnet: after R-Net; nms_onet: after O-Net, where the
        overlap is over the smaller box's area.
    max_candidates: at most this many best P-Net cells per level, and boxes into the level-merging
        NMS. A box's fate depends only on better boxes, so this cap drops the worst candidates and
        changes nothing else; it bounds memory and time on cluttered photos.
    """

    pyramid_floor: float = 20.0
    scale_factor: float = 0.709
    threshold_pnet: float = 0.6
    threshold_rnet: float = 0.7
    threshold_onet: float = 0.8
    nms_pnet_level: float = 0.5
    nms_pnet: float = 0.7
    nms_rnet: float = 0.7
    nms_onet: float = 0.7
    max_candidates: int = 4000

    def __post_init__(self) -> None:
        if not (math.isfinite(self.pyramid_floor) and self.pyramid_floor > 0):
            raise FaceDetectorError(
                f"pyramid_floor must be a positive number of pixels, got {self.pyramid_floor}"
            )
        if not 0.0 < self.scale_factor < 1.0:
            raise FaceDetectorError(f"scale_factor must be in (0, 1), got {self.scale_factor}")
        for name in ("threshold_pnet", "threshold_rnet", "threshold_onet"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise FaceDetectorError(f"{name} must be in [0, 1), got {value}")
        for name in ("nms_pnet_level", "nms_pnet", "nms_rnet", "nms_onet"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise FaceDetectorError(f"{name} must be in [0, 1], got {value}")
        if self.max_candidates < 1:
            raise FaceDetectorError(f"max_candidates must be at least 1, got {self.max_candidates}")


def _as_chw_uint8(image: Tensor | np.ndarray, device: torch.device) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InputShapeError(
                f"face detector input must be an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}"
            )
        # torch wants writable memory; photos decoded elsewhere are often read-only views.
        array = image if image.flags.writeable else image.copy()
        image = torch.from_numpy(array).permute(2, 0, 1)
    elif not isinstance(image, Tensor):
        raise InputShapeError(
            f"face detector input must be a tensor or numpy array, got {type(image).__name__}"
        )
    if image.dim() != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
        raise InputShapeError(
            f"face detector input must be a (3, H, W) uint8 RGB tensor, got {tuple(image.shape)} "
            f"{image.dtype}"
        )
    return image.to(device)


class MTCNNDetector:
    """MTCNN (P-Net → R-Net → O-Net) in torch, on one device, with the ``mtcnn`` package's semantics.

    Build it with :meth:`load` (or :func:`~inference.faces.create_detector`). :meth:`detect` is the
    whole detector; the stages are public too (:meth:`prepare`, :meth:`propose`, :meth:`refine`,
    :meth:`output`) so benchmarks can time each. Between stages, candidates are (N, 5) float32
    tensors on the device: ``x1, y1, x2, y2, score`` in image pixels, best score first.

    ``dtype`` is the networks' compute dtype; resizing, crops and box arithmetic stay float32/float64.
    float32 reproduces the package. float16 moves boxes by a fraction of a pixel, bfloat16 by a few
    pixels; on the 2-core CPU neither is faster (measured), they are for GPUs. The networks run
    channels-last, which is what makes the 3-channel first convolutions fast on CPU. The only state
    kept between calls is a small cache of pyramid layouts, one per input size.
    """

    def __init__(
        self,
        pnet: nn.Module,
        rnet: nn.Module,
        onet: nn.Module,
        *,
        config: MTCNNConfig | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self._device = torch.device(device)
        self._dtype = dtype
        self.config = config if config is not None else MTCNNConfig()
        # Copies: Module.to works in place, and the caller's networks may serve another detector.
        # torch's stubs omit Module.to's memory_format keyword, which it accepts.
        nets = [
            copy.deepcopy(net).to(device=self._device, dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]
            for net in (pnet, rnet, onet)
        ]
        self.pnet, self.rnet, self.onet = nets
        self._layouts: OrderedDict[tuple[int, int], _Pyramid | None] = OrderedDict()
        self._layouts_lock = threading.Lock()

    @classmethod
    def load(
        cls,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        config: MTCNNConfig | None = None,
        weights_dir: Path | None = None,
    ) -> MTCNNDetector:
        """Read the three weight files (default: those inside the installed ``mtcnn`` package).

        Raises :class:`FaceDetectorError` when a file is missing or is not a numpy-only joblib dump
        of the expected arrays.
        """
        folder = weights_dir if weights_dir is not None else package_weights_dir()
        nets = {}
        for kind, filename in MTCNN_WEIGHT_FILES.items():
            path = folder / filename
            if not path.is_file():
                raise FaceDetectorError(f"face detector weights not found: {path}")
            nets[kind] = _load_network(kind, path)
        return cls(nets["pnet"], nets["rnet"], nets["onet"], config=config, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def with_config(self, **changes: Any) -> MTCNNDetector:
        """A detector sharing these networks, with some :class:`MTCNNConfig` fields changed."""
        try:
            config = replace(self.config, **changes)
        except TypeError as exc:  # an unknown field, or a value of the wrong type
            raise FaceDetectorError(f"bad MTCNN option: {exc}") from exc
        clone = copy.copy(self)
        clone.config = config
        clone._layouts = OrderedDict()  # layouts depend on pyramid_floor and scale_factor
        clone._layouts_lock = threading.Lock()
        return clone

    # -- stages ------------------------------------------------------------------------------------

    @torch.inference_mode()
    def prepare(self, image: Tensor | np.ndarray) -> Tensor:
        """(3, H, W) uint8 RGB tensor or (H, W, 3) uint8 RGB array → (3, H, W) float32 RGB 0..255 on
        the device: what the other stages read."""
        # Contiguous (3, H, W): an HWC array's permuted view would slow the integral image and crops.
        return _as_chw_uint8(image, self._device).contiguous().float()

    def _pyramid(self, height: int, width: int) -> _Pyramid | None:
        key = (height, width)
        with self._layouts_lock:
            if key in self._layouts:
                self._layouts.move_to_end(key)
                return self._layouts[key]
        plan = _plan_pyramid(height, width, self.config, self._device)
        with self._layouts_lock:
            self._layouts[key] = plan
            if len(self._layouts) > _LAYOUT_CACHE_SIZE:
                self._layouts.popitem(last=False)
        return plan

    def _run(self, net: nn.Module, x: Tensor, *args: Any) -> list[Tensor]:
        outputs = net(x.to(self._dtype).contiguous(memory_format=torch.channels_last), *args)
        return [y.float() for y in outputs]

    @torch.inference_mode()
    def propose(self, pixels: Tensor) -> Tensor:
        """P-Net over the whole pyramid in one pass → squared candidates (N, 5), best first."""
        cfg = self.config
        plan = self._pyramid(pixels.shape[1], pixels.shape[2])
        if plan is None:
            return pixels.new_zeros(0, 5)
        reg, logits = self._run(self.pnet, _pyramid_canvas(pixels, plan), plan.outside)
        prob = torch.softmax(logits[0], 0)[1]
        cy, cx = torch.nonzero((prob > cfg.threshold_pnet) & (plan.cell_level >= 0), as_tuple=True)
        level = plan.cell_level[cy, cx]
        score = prob[cy, cx]
        offsets = reg[0, :, cy, cx].T
        # The cell's box on its level, moved by the regression (in box sides), then to image pixels.
        y0 = (cy - plan.origin[level, 0]) * PNET_STRIDE + 1
        x0 = (cx - plan.origin[level, 1]) * PNET_STRIDE + 1
        side = PNET_WINDOW - 1
        corners = torch.stack([x0, y0, x0 + side, y0 + side], 1).float() + offsets * side
        boxes = torch.cat([corners / plan.scale[level, None], score[:, None]], 1)
        # Per level: best first, capped, NMS; then all levels together.
        order = torch.argsort(score, descending=True, stable=True)
        order = order[torch.argsort(level[order], stable=True)]
        boxes, level = boxes[order], level[order]
        counts = torch.bincount(level, minlength=len(plan.levels))
        rank = torch.arange(level.shape[0], device=level.device) - (torch.cumsum(counts, 0) - counts)[level]
        boxes, level = boxes[rank < cfg.max_candidates], level[rank < cfg.max_candidates]
        boxes = boxes[nms_keep(boxes[:, :4], cfg.nms_pnet_level, "union", groups=level)]
        boxes = boxes[torch.argsort(boxes[:, 4], descending=True, stable=True)][: cfg.max_candidates]
        boxes = boxes[nms_keep(boxes[:, :4], cfg.nms_pnet, "union")]
        return _square(boxes)

    def _crops(self, pixels: Tensor, candidates: Tensor, size: int) -> Tensor:
        # Cropped from the 0..255 pixels, then normalised: TF's 0 outside the image is mid-grey.
        crops = crop_and_resize(pixels, candidates[:, :4], size, extrapolation_value=PIXEL_MEAN)
        return (crops - PIXEL_MEAN) / PIXEL_SCALE

    @torch.inference_mode()
    def refine(self, pixels: Tensor, candidates: Tensor) -> Tensor:
        """R-Net on 24² crops of the candidates → regressed, filtered, squared candidates (N, 5)."""
        if candidates.shape[0] == 0:
            return candidates
        offsets, logits = self._run(self.rnet, self._crops(pixels, candidates, RNET_SIZE))
        score = torch.softmax(logits, 1)[:, 1]
        boxes = torch.cat([_regress(candidates[:, :4], offsets), score[:, None]], 1)
        boxes = boxes[score > self.config.threshold_rnet]
        boxes = boxes[torch.argsort(boxes[:, 4], descending=True, stable=True)]
        boxes = boxes[nms_keep(boxes[:, :4], self.config.nms_rnet, "union")]
        return _square(boxes)

    @torch.inference_mode()
    def output(self, pixels: Tensor, candidates: Tensor) -> Tensor:
        """O-Net on 48² crops → faces (N, 15): ``x1, y1, x2, y2, score``, then the five landmarks as
        ``x, y`` pairs in :data:`~inference.faces.LANDMARK_NAMES` order; image pixels, best first,
        boxes not clipped."""
        if candidates.shape[0] == 0:
            return candidates.new_zeros(0, 15)
        offsets, marks, logits = self._run(self.onet, self._crops(pixels, candidates, ONET_SIZE))
        score = torch.softmax(logits, 1)[:, 1]
        # Landmarks are in units of the input box, from a one-based origin (hence the -1).
        w = candidates[:, 2:3] - candidates[:, 0:1] + 1
        h = candidates[:, 3:4] - candidates[:, 1:2] + 1
        xs = w * marks[:, :5] + candidates[:, 0:1] - 1
        ys = h * marks[:, 5:] + candidates[:, 1:2] - 1
        points = torch.stack([xs, ys], 2).flatten(1)
        faces = torch.cat([_regress(candidates[:, :4], offsets), score[:, None], points], 1)
        faces = faces[score > self.config.threshold_onet]
        faces = faces[torch.argsort(faces[:, 4], descending=True, stable=True)]
        return faces[nms_keep(faces[:, :4], self.config.nms_onet, "min")]

    # -- whole detector ----------------------------------------------------------------------------

    @torch.inference_mode()
    def detect_tensor(self, image: Tensor | np.ndarray) -> Tensor:
        """All three stages → (N, 15) float32 on the device, as :meth:`output`, with the boxes clipped
        to the image (``[0, W - 1] × [0, H - 1]``)."""
        pixels = self.prepare(image)
        faces = self.output(pixels, self.refine(pixels, self.propose(pixels)))
        height, width = pixels.shape[1:]
        faces[:, 0:4:2] = faces[:, 0:4:2].clamp(0, width - 1)
        faces[:, 1:4:2] = faces[:, 1:4:2].clamp(0, height - 1)
        return faces

    def detect(self, image: Tensor | np.ndarray) -> list[DetectedFace]:
        """Faces in ``image``, best score first (see :class:`~inference.faces.FaceDetector`)."""
        faces = []
        for row in self.detect_tensor(image).cpu().numpy():
            landmarks = row[5:15].reshape(5, 2).astype(np.float32)
            landmarks.flags.writeable = False
            x1, y1, x2, y2 = (float(v) for v in row[:4])
            faces.append(DetectedFace(box=(x1, y1, x2, y2), score=float(row[4]), landmarks=landmarks))
        return faces


def _create_mtcnn(
    device: torch.device | str, dtype: torch.dtype, smallest_face: float | None = None, **options: Any
) -> MTCNNDetector:
    weights_dir = options.pop("weights_dir", None)
    if smallest_face is not None and "pyramid_floor" not in options:
        # No pyramid level finer than the smallest face asked for: the P-Net pass over the largest
        # levels is most of the detector's time. P-Net's 12-pixel window is the lowest floor there is.
        options["pyramid_floor"] = max(float(PNET_WINDOW), smallest_face)
    known = {f.name for f in fields(MTCNNConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise FaceDetectorError(f"unknown MTCNN option(s) {unknown}; known: {sorted(known)}")
    try:
        config = MTCNNConfig(**options)
    except TypeError as exc:  # a value of the wrong type
        raise FaceDetectorError(f"bad MTCNN option: {exc}") from exc
    return MTCNNDetector.load(device=device, dtype=dtype, config=config, weights_dir=weights_dir)


register_detector("mtcnn", _create_mtcnn)
