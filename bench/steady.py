"""How steady the cartoon of a clip is: frame by frame against tracked faces and flow-guided steadying,
on clips whose true motion is known.

    python -m bench.steady [--frames 24] [--size 480] [--json bench/results/steady.json]

Two clips are made from the benchmarks' one-face photo (Grace Hopper, 1024×768), ``--size`` pixels
high at 4:3, with independent sensor noise (Gaussian, σ 4 levels) on every frame:

* **pan**: the window moves 3 pixels right per frame across the photo, so the true motion from each
  frame back to the previous one is exactly 3 pixels;
* **still**: the window stays; the true motion is zero.

Each clip goes through the pipeline (synthetic anime model, the dtype the service picks) twice:
**frame by frame** (every frame on its own, as upstream's video script does) and **steady** (faces
tracked and their landmarks smoothed, :class:`inference.tracking.FaceTracker`; the output blended
with the previous one along the optical flow, :class:`inference.temporal.Steadier`). Frames stay
in memory, uint8: what a lossless encode would hold.

Measured the way temporal-consistency papers do (Lai et al. 2018): the **warping error**, the mean
absolute difference between each output frame and the previous output moved by the true motion, away
from the borders; targets: pan ≤ 0.6×, still ≤ 0.8× frame by frame. And how far each steady frame is
from its own frame-by-frame cartoon (mean absolute difference; target: every frame ≤ 3 levels), the
landmark jitter of the tracked faces against the detector's (how far the eye centres move from
one frame to the next once the true motion is taken out), and what the steadying steps cost per
frame against the pipeline.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.report import write_report
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import write_fast_model_dir
from inference.pipeline import Cartoonizer, Options
from inference.temporal import Steadier, warping_error
from inference.tracking import FaceTracker
from service.factory import loaded_engine
from service.settings import Settings

NOISE_SIGMA = 4.0
PAN_PX = 3
FPS = 25.0
#: Pixels from the frame's edge left out of the measures (the warp repeats the edge there).
BORDER = 8


def make_clip(kind: str, frames: int, height: int, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """The frames (uint8 RGB) and the true motion per frame in pixels (x, from a frame back to the
    previous one)."""
    photo = one_face_1024x768()
    width = height * 4 // 3
    scale = height / 560  # the window shows the face at about the same size whatever --size is
    big = np.asarray(
        Image.fromarray(photo).resize((round(1024 * scale), round(768 * scale)), Image.Resampling.LANCZOS)
    )
    step = PAN_PX if kind == "pan" else 0
    top = (big.shape[0] - height) // 2
    left = max(0, (big.shape[1] - width - step * frames) // 2)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(frames):
        window = big[top : top + height, left + i * step : left + i * step + width].astype(np.float32)
        noisy = window + rng.normal(0.0, NOISE_SIGMA, window.shape)
        out.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    return out, step


def truth(frames: list[np.ndarray], step: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The true flow from each frame back to the previous one, and where it is measured."""
    h, w = frames[0].shape[:2]
    flow = np.zeros((h, w, 2), np.float32)
    flow[..., 0] = step
    valid = np.zeros((h, w), bool)
    valid[BORDER : h - BORDER, BORDER : w - BORDER - step] = True
    return [flow] * (len(frames) - 1), [valid] * (len(frames) - 1)


def run(cartoonizer: Cartoonizer, frames: list[np.ndarray], steady: bool) -> dict[str, Any]:
    tracker = FaceTracker() if steady else None
    steadier = Steadier() if steady else None
    outputs, eyes, model_ms, steady_ms = [], [], [], []
    for i, frame in enumerate(frames):
        start = time.perf_counter()
        result = cartoonizer.run(frame, Options(tracker=tracker, time_s=i / FPS, keep_stages=True))
        model_ms.append((time.perf_counter() - start) * 1000)
        eyes.append(np.array(result.faces[0].landmarks[:2]) if result.faces else np.full((2, 2), np.nan))
        out = result.image
        if steadier is not None:
            assert result.stages is not None
            start = time.perf_counter()
            out = steadier(result.stages.photo, out)
            steady_ms.append((time.perf_counter() - start) * 1000)
        outputs.append(out)
    return {"frames": outputs, "eyes": np.stack(eyes), "model_ms": model_ms, "steady_ms": steady_ms}


def jitter(eyes: np.ndarray, step: int) -> float:
    """How far (pixels, mean) the eye centres move from one frame to the next once the true motion
    is taken out."""
    moved = eyes.copy()
    moved[:, :, 0] += step * np.arange(len(eyes))[:, None]
    return float(np.nanmean(np.abs(np.diff(moved, axis=0))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--size", type=int, default=480)
    ap.add_argument("--json", type=Path, default=Path("bench/results/steady.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    settings = Settings(model_dir=tmp / "models", cache_dir=tmp / "cache", allow_download=False, device="cpu")
    engine = loaded_engine(settings)
    cartoonizer = engine.cartoonizer("anime")
    rows = []
    ok = True
    try:
        for kind, target in (("pan", 0.6), ("still", 0.8)):
            frames, step = make_clip(kind, args.frames, args.size)
            flows, valid = truth(frames, step)
            plain = run(cartoonizer, frames, steady=False)
            steady = run(cartoonizer, frames, steady=True)
            e_plain = warping_error(plain["frames"], flows, valid)
            e_steady = warping_error(steady["frames"], flows, valid)
            e_input = warping_error(frames, flows, valid)
            apart = [
                float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
                for a, b in zip(steady["frames"], plain["frames"], strict=True)
            ]
            row = {
                "clip": kind,
                "input_warping_error": e_input,
                "frame_by_frame": e_plain,
                "steady": e_steady,
                "ratio": e_steady / e_plain,
                "target_ratio": target,
                "max_mean_apart": max(apart),
                "mean_apart": statistics.mean(apart),
                "eye_jitter_px": {
                    "detector": jitter(plain["eyes"], step),
                    "tracked": jitter(steady["eyes"], step),
                },
                "pipeline_ms": statistics.median(plain["model_ms"]),
                "tracked_pipeline_ms": statistics.median(steady["model_ms"]),
                "steadier_ms": statistics.median(steady["steady_ms"]),
            }
            ok = ok and row["ratio"] <= target and row["max_mean_apart"] <= 3.0
            rows.append(row)
    finally:
        engine.close()
    info = dict(
        python=platform.python_version(), torch=torch.__version__, frames=args.frames, size=args.size,
        noise_sigma=NOISE_SIGMA, pan_px=PAN_PX,
    )  # fmt: skip
    print(f"# steadiness benchmark  {json.dumps(info)}")
    print(
        f"{'clip':6} {'input':>7} {'frame-by-frame':>15} {'steady':>8} {'ratio':>6} {'target':>7} "
        f"{'apart max':>10} {'eye jitter det→trk':>19} {'pipeline':>9} {'steadier':>9}"
    )
    for r in rows:
        jit = r["eye_jitter_px"]
        print(
            f"{r['clip']:6} {r['input_warping_error']:7.2f} {r['frame_by_frame']:15.2f} {r['steady']:8.2f} "
            f"{r['ratio']:6.2f} {'≤' + str(r['target_ratio']):>7} {r['max_mean_apart']:10.2f} "
            f"{jit['detector']:9.2f}→{jit['tracked']:.2f} {r['pipeline_ms']:7.0f}ms {r['steadier_ms']:7.1f}ms"
        )
    write_report(args.json, {"info": info, "rows": rows})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
