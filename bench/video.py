"""A clip through the service's clip flow against the pipeline alone on the same frames, and how steady
its output is, measured on lossless files.

    python -m bench.video [--frames 24] [--json bench/results/video.json]

With the synthetic anime model and the dtype the service picks, for a panning portrait with sensor
noise (bench/steady.py's clip) at 480p (640×480) and 720p (960×720):

1. **the pipeline alone**: every frame, already decoded in memory, through ``Cartoonizer.run``
   (what cartoonizing the frames one by one costs at the least): frames/s;
2. **the clip flow** (``serving/clips.py``), file to file, as ``toonserve cartoonize clip.mp4 out.mp4``
   runs it: PyAV decode, the worker with the clip's face tracker, the steadier, the resize, H.264
   encode (quality 90) in crash-safe segments, and the join with the audio: frames/s, and what the
   video machinery (decode, tracking, steadying, encode, join) adds to the pipeline alone
   (target ≤ 20 %); the per-step milliseconds it reports;
3. **steadiness on lossless output**: the 480p pan clip and a still one, each written losslessly
   (quality 100, H.264 4:4:4 at qp 0) and put through the clip flow frame by frame (``--no-steady``)
   and steadied, also at quality 100; the outputs read back and measured as temporal-consistency
   papers do: the warping error (true motion) of steady against frame by frame (targets: pan ≤ 0.6×,
   still ≤ 0.8×), and each steady frame's mean distance from its frame-by-frame cartoon (≤ 3 levels).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.report import write_report
from bench.steady import make_clip, truth
from devkit.clips import write_test_clip
from devkit.reference_graphs import write_fast_model_dir
from inference.pipeline import Options
from inference.temporal import warping_error
from service.factory import build_flow, loaded_engine
from service.settings import Settings
from serving.clips import ClipFlow
from serving.options import RequestOptions
from serving.video import read_frames

FPS = 25


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--json", type=Path, default=Path("bench/results/video.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    settings = Settings(model_dir=tmp / "models", cache_dir=tmp / "cache", allow_download=False, device="cpu")
    engine = loaded_engine(settings)
    flow = build_flow(settings, engine)
    cartoonizer = engine.cartoonizer("anime")
    precision = engine.store.precision_of(engine.default_style)  # while loaded: auto may pick int8
    speed: list[dict[str, Any]] = []
    steadiness: list[dict[str, Any]] = []
    ok = True
    try:
        params = flow.options(RequestOptions())
        for name, height in (("480p", 480), ("720p", 720)):
            frames, _ = make_clip("pan", args.frames, height)
            source = tmp / f"{name}.mp4"
            write_test_clip(source, frames, fps=FPS, audio=True, quality=100)
            cartoonizer.run(frames[0], Options())  # warm-up at this size
            start = time.perf_counter()
            for frame in frames:
                cartoonizer.run(frame, Options(min_face_size=settings.min_face_size))
            alone = len(frames) / (time.perf_counter() - start)
            report = asyncio.run(
                ClipFlow(flow, settings.video_limits).run(source, tmp / f"{name}-out.mp4", params)
            )
            overhead = alone / report.frames_per_s - 1
            ok = ok and overhead <= 0.20
            speed.append(
                {
                    "clip": name,
                    "frames": len(frames),
                    "pipeline_alone_fps": alone,
                    "clip_flow_fps": report.frames_per_s,
                    "machinery_overhead": overhead,
                    "clip_flow_ms": report.timings_ms,
                }
            )

        lossless = flow.options(RequestOptions(quality=100))
        for kind, target in (("pan", 0.6), ("still", 0.8)):
            frames, step = make_clip(kind, args.frames, 480)
            source = tmp / f"{kind}.mp4"
            write_test_clip(source, frames, fps=FPS, quality=100)
            outs = {}
            for steady in (False, True):
                out = tmp / f"{kind}-{'steady' if steady else 'plain'}.mp4"
                asyncio.run(ClipFlow(flow, settings.video_limits, steady=steady).run(source, out, lossless))
                outs[steady] = [f.rgb for f in read_frames(out)]
            flows, valid = truth(frames, step)
            plain, steady_err = (
                warping_error(outs[False], flows, valid),
                warping_error(outs[True], flows, valid),
            )
            apart = [
                float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())
                for a, b in zip(outs[True], outs[False], strict=True)
            ]
            ratio = steady_err / plain if plain else float("nan")
            ok = ok and ratio <= target and max(apart) <= 3.0
            steadiness.append(
                {
                    "clip": kind,
                    "input": warping_error(frames, flows, valid),
                    "frame_by_frame": plain,
                    "steady": steady_err,
                    "ratio": ratio,
                    "target": target,
                    "max_mean_apart": max(apart),
                    "mean_apart": statistics.mean(apart),
                }
            )
    finally:
        flow.close()
        engine.close(drain=False)

    info = dict(python=platform.python_version(), torch=torch.__version__, frames=args.frames,
                dtype=precision.name, dtype_reason=precision.reason)  # fmt: skip
    print(f"# video benchmark  {json.dumps(info)}")
    head = f"{'clip':6} {'pipeline alone':>15} {'clip flow':>10} {'machinery':>10}"
    print(f"{head}   clip flow ms (decode, model, steady, resize, encode)")
    for r in speed:
        ms = ", ".join(f"{k} {v:.0f}" for k, v in r["clip_flow_ms"].items())
        print(
            f"{r['clip']:6} {r['pipeline_alone_fps']:11.2f} f/s {r['clip_flow_fps']:6.2f} f/s "
            f"{r['machinery_overhead'] * 100:+8.1f} %   {ms}"
        )
    head = f"{'clip':6} {'input':>7} {'frame-by-frame':>15} {'steady':>8} {'ratio':>6}"
    print(f"{head} {'target':>7} {'apart max':>10}")
    for r in steadiness:
        print(
            f"{r['clip']:6} {r['input']:7.2f} {r['frame_by_frame']:15.2f} {r['steady']:8.2f} "
            f"{r['ratio']:6.2f} {'≤' + str(r['target']):>7} {r['max_mean_apart']:10.2f}"
        )
    write_report(args.json, {"info": info, "speed": speed, "steadiness": steadiness})
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
