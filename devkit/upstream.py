"""Upstream's compound flow, run with ModelScope's own code and the TensorFlow graphs (tests and bench).

ModelScope's ``ImageCartoonPipeline`` needs ``detector.pb`` and ``keypoints.pb`` (facelib), which
cannot be downloaded here, so :class:`UpstreamFlow` runs everything else exactly as the pipeline does
(dctnet.md §4): cv2 INTER_AREA resize to 720, ``padTo16x`` with white, the TF background graph,
ModelScope's own ``warp_and_crop_face`` (loaded from its file), the TF head graph one face at a time,
``cv2.warpAffine`` of head and mask back, the float blend, and the INTER_AREA resize back — with the
five points of each face supplied by the caller in place of facelib's.
"""

from __future__ import annotations

import importlib.util
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from devkit.reference_graphs import TFGenerator


def load_upstream_align() -> types.SimpleNamespace:
    """ModelScope's ``align_trans`` and ``matlab_cp2tform`` modules, loaded from their files.

    Importing them through the ``modelscope`` package would pull in its whole model registry.
    """
    spec = importlib.util.find_spec("modelscope")
    assert spec is not None and spec.submodule_search_locations
    src = f"{spec.submodule_search_locations[0]}/models/cv/cartoon/mtcnn_pytorch/src"
    package = types.ModuleType("_upstream_align")
    package.__path__ = [src]
    sys.modules[package.__name__] = package
    modules = {}
    for name in ("matlab_cp2tform", "align_trans"):  # align_trans imports .matlab_cp2tform
        module_spec = importlib.util.spec_from_file_location(f"{package.__name__}.{name}", f"{src}/{name}.py")
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_spec.name] = module
        module_spec.loader.exec_module(module)
        modules[name] = module
    return types.SimpleNamespace(align=modules["align_trans"], cp2tform=modules["matlab_cp2tform"])


@dataclass
class UpstreamFlow:
    """The official flow with TF graphs; ``run(rgb, five_points_per_face)`` → (H, W, 3) float32 RGB."""

    head_pb: bytes
    bg_pb: bytes
    mask_path: Path
    timings_ms: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        import cv2

        self._cv2: Any = cv2
        self._align = load_upstream_align().align
        self._head = TFGenerator(self.head_pb, prefix="model_anime_head")
        self._bg = TFGenerator(self.bg_pb, prefix="model_anime_bg")
        mask = cv2.imread(str(self.mask_path))
        assert mask is not None, f"cannot read {self.mask_path}"
        mask = cv2.resize(mask, (288, 288), interpolation=cv2.INTER_AREA)
        self._mask = cv2.cvtColor(mask, cv2.COLOR_BGR2GRAY).astype(np.float32) / 255.0

    def _tick(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        self.timings_ms[stage] = self.timings_ms.get(stage, 0.0) + (now - start) * 1000
        return now

    def processing_image(self, rgb: np.ndarray) -> np.ndarray:
        cv2 = self._cv2
        h, w = rgb.shape[:2]
        if min(h, w) > 720:
            nh, nw = (720, int(720 * w / h)) if h <= w else (int(720 * h / w), 720)
        else:
            nh, nw = h, w
        out: np.ndarray = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        return out

    def run(self, rgb: np.ndarray, faces_five_points: list[np.ndarray]) -> np.ndarray:
        """``faces_five_points``: per face, (5, 2) points in processing-image pixels, largest face first."""
        cv2 = self._cv2
        self.timings_ms = {}
        t = time.perf_counter()
        ori_h, ori_w = rgb.shape[:2]
        img = self.processing_image(rgb)
        t = self._tick("resize", t)
        bgr = img[:, :, ::-1]
        h, w = bgr.shape[:2]
        ph, pw = h, w
        if h % 16 or w % 16:
            ph, pw = (h // 16 + 1) * 16, (w // 16 + 1) * 16
        pad = np.full((ph, pw, 3), 255, np.uint8)
        pad[:h, :w] = bgr
        res: np.ndarray = self._bg(pad)[:h, :w]
        t = self._tick("background", t)
        ref = self._align.get_reference_facial_points(default_square=True)
        for points in faces_five_points:
            head_rgb, tfm_inv = self._align.warp_and_crop_face(
                img, points, ratio=0.75, reference_pts=ref, crop_size=(288, 288), return_trans_inv=True
            )
            t = self._tick("align", t)
            head = self._head(np.ascontiguousarray(head_rgb[:, :, ::-1]))
            t = self._tick("head", t)
            head_w = cv2.warpAffine(head, tfm_inv, (w, h), borderValue=(0, 0, 0))
            mask_w = cv2.warpAffine(self._mask, tfm_inv, (w, h), borderValue=(0, 0, 0))[:, :, None]
            res = mask_w * head_w + (1 - mask_w) * res
            t = self._tick("blend", t)
        out: np.ndarray = cv2.resize(res, (ori_w, ori_h), interpolation=cv2.INTER_AREA)
        self._tick("resize_out", t)
        return np.ascontiguousarray(out[:, :, ::-1].astype(np.float32))

    def close(self) -> None:
        self._head.close()
        self._bg.close()
