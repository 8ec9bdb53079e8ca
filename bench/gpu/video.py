"""Section ``video``: a 720p clip through the clip flow on the device, steadied and frame by frame."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bench.gpu.common import TARGET_VIDEO_FPS, Context, table
from bench.steady import NOISE_SIGMA, PAN_PX
from devkit.clips import write_test_clip
from devkit.photos import one_face_1024x768
from inference.pipeline import Options
from service.factory import build_flow
from serving.clips import ClipFlow
from serving.options import RequestOptions

#: The steps :class:`serving.clips.ClipReport` times, in its order.
STEPS = ("decode", "model", "steady", "resize", "encode")


def pan_clip(width: int, height: int, frames: int, seed: int = 0) -> list[np.ndarray]:
    """bench/steady.py's panning portrait at any size: the one-face photo scaled to cover the window
    and its pan, the window moving :data:`~bench.steady.PAN_PX` pixels right per frame, independent
    Gaussian noise (σ :data:`~bench.steady.NOISE_SIGMA`) on every frame; (H, W, 3) uint8 RGB."""
    photo = one_face_1024x768()
    ph, pw = photo.shape[:2]
    travel = PAN_PX * frames
    scale = max(height / ph, (width + travel) / pw)
    big = np.asarray(
        Image.fromarray(photo).resize((round(pw * scale), round(ph * scale)), Image.Resampling.LANCZOS)
    )
    top = (big.shape[0] - height) // 2
    left = max(0, (big.shape[1] - width - travel) // 2)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(frames):
        window = big[top : top + height, left + i * PAN_PX : left + i * PAN_PX + width].astype(np.float32)
        noise = rng.standard_normal(window.shape, dtype=np.float32) * NOISE_SIGMA
        out.append(np.clip(np.rint(window + noise), 0, 255).astype(np.uint8))
    return out


def section_video(ctx: Context, deadline: float) -> dict[str, Any]:
    plan = ctx.plan
    width, height = plan.video_size
    result: dict[str, Any] = dict(pyav_cuda=_probe_codecs(ctx))
    # The service's precision on the device ("auto": float16 on a GPU with tensor cores); the dry run
    # shares the pipeline section's float32 engine (the CPU's bfloat16 would be emulated and slow).
    setting = "float32" if plan.dry else "auto"
    engine = ctx.engine(ctx.device.type, setting)
    settings = ctx.settings(ctx.device.type, setting)
    result["dtype"] = engine.store.precision_of(engine.default_style).name

    start = time.perf_counter()
    frames = pan_clip(width, height, plan.video_frames)
    source = write_test_clip(ctx.tmp / "clip.mp4", frames, fps=plan.video_fps, quality=100)
    warm = write_test_clip(
        ctx.tmp / "clip-warm.mp4", frames[: plan.video_warmup], fps=plan.video_fps, quality=100
    )
    result["clip"] = dict(
        size=f"{width}x{height}",
        frames=len(frames),
        fps=plan.video_fps,
        lossless_mib=round(source.stat().st_size / 2**20, 1),
        made_s=round(time.perf_counter() - start, 1),
    )

    flow = build_flow(settings, engine)
    rows: list[dict[str, Any]] = []
    try:
        params = flow.options(RequestOptions())
        processing = flow.processing_shape(params, (height, width))
        result["processing_size"] = f"{processing[1]}x{processing[0]}"
        # Warm-up at this size (cuDNN's choices, the tracker, the steadier, the encoder).
        asyncio.run(ClipFlow(flow, settings.video_limits).run(warm, ctx.tmp / "clip-warm-out.mp4", params))
        result["model_alone"] = _model_alone(ctx, engine, frames, settings.min_face_size, deadline)
        last_s = 0.0  # the last run's seconds: a run that would end past the deadline is not started
        for steady in (True, False):
            row: dict[str, Any] = dict(mode="steady" if steady else "frame by frame")
            runs: list[dict[str, Any]] = []
            for k in range(plan.video_repeats):
                if time.monotonic() + last_s > deadline:
                    break
                out = ctx.tmp / f"clip-out-{row['mode'].replace(' ', '-')}-{k}.mp4"
                began = time.perf_counter()
                report = asyncio.run(
                    ClipFlow(flow, settings.video_limits, steady=steady).run(source, out, params)
                )
                runs.append(
                    dict(
                        seconds=round(time.perf_counter() - began, 2),
                        frames_per_s=round(report.frames_per_s, 2),
                        frames=report.frames,
                        faces_max=report.faces_max,
                        timings_ms=report.timings_ms,
                        out_mib=round(out.stat().st_size / 2**20, 2),
                    )
                )
                out.unlink(missing_ok=True)
                last_s = runs[-1]["seconds"]
            if not runs:
                rows.append({**row, "skipped": "time budget"})
                continue
            best = max(runs, key=lambda r: r["frames_per_s"])
            row.update(
                frames_per_s=best["frames_per_s"],
                runs_frames_per_s=[r["frames_per_s"] for r in runs],
                frames=best["frames"],
                faces_max=best["faces_max"],
                out_mib=best["out_mib"],
                step_ms_total=best["timings_ms"],
                step_ms_per_frame={
                    s: round(best["timings_ms"].get(s, 0.0) / best["frames"], 2) for s in STEPS
                },
                target_met=None if plan.dry else best["frames_per_s"] >= TARGET_VIDEO_FPS,
            )
            rows.append(row)
    finally:
        flow.close()
    result["rows"] = rows
    result["target_frames_per_s"] = TARGET_VIDEO_FPS
    _print(ctx, result)
    return result


def _model_alone(
    ctx: Context, engine: Any, frames: list[np.ndarray], min_face_size: float, deadline: float
) -> dict[str, Any] | None:
    """Frames already in memory through ``Cartoonizer.run`` one by one: what the models cost per frame
    at the least, without decoding, steadying or encoding."""
    if time.monotonic() > deadline:
        return None
    c = engine.cartoonizer("anime")
    take = frames[: max(2, len(frames) // 3)]
    c.run(take[0], Options(min_face_size=min_face_size))
    times = []
    for frame in take:
        began = time.perf_counter()
        c.run(frame, Options(min_face_size=min_face_size))
        times.append(time.perf_counter() - began)
    median = statistics.median(times)
    return dict(frames=len(take), median_ms=round(median * 1000, 2), frames_per_s=round(1 / median, 2))


def _probe_codecs(ctx: Context) -> dict[str, Any]:
    """``bench.gpu.avprobe`` in a child process: PyAV's CUDA decoders and encoders, listed and tried."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.gpu.avprobe"],
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return dict(error="the probe did not answer within 60 s")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        return dict(error=f"the probe exited with status {proc.returncode}: {proc.stderr.strip()[-300:]}")
    found: dict[str, Any] = json.loads(lines[-1])
    ffmpeg_said = [line for line in proc.stderr.splitlines() if line.strip()]
    if ffmpeg_said:
        found["ffmpeg_log"] = ffmpeg_said[-4:]
    return found


def _print(ctx: Context, result: dict[str, Any]) -> None:
    clip = result["clip"]
    target = "dry run" if ctx.plan.dry else f"≥ {TARGET_VIDEO_FPS:.0f}"
    table(
        f"clip flow on {ctx.label}, {result['dtype']}: {clip['size']} lossless pan, {clip['frames']} frames "
        f"at {clip['fps']} fps, processed at {result['processing_size']}, H.264 out (quality 90); one stream",
        ["mode", "frames/s", "target", "met", "runs", *[f"{s} ms/f" for s in STEPS], "faces"],
        [
            [
                r["mode"],
                r.get("frames_per_s", r.get("skipped")),
                target,
                "-" if r.get("target_met") is None else "yes" if r["target_met"] else "no",
                " ".join(str(v) for v in r.get("runs_frames_per_s", [])),
                *[r.get("step_ms_per_frame", {}).get(s) for s in STEPS],
                r.get("faces_max"),
            ]
            for r in result["rows"]
        ],
    )
    alone = result.get("model_alone")
    if alone:
        print(
            f"   the models alone, frames in memory (Cartoonizer.run, {alone['frames']} frames): "
            f"{alone['frames_per_s']} frames/s, {alone['median_ms']} ms median"
        )
    print("   steps overlap (decode and encode run beside the model): ms/frame is each step's own time")
    probe = result["pyav_cuda"]
    if "error" in probe:
        print(f"   PyAV CUDA codecs: probe failed: {probe['error']}")
    else:
        print(
            f"   PyAV {probe['pyav']} (libavcodec {probe['libavcodec']}) lists CUDA decoders "
            f"{', '.join(probe['cuda_decoders_listed']) or 'none'}; encoders "
            f"{', '.join(probe['cuda_encoders_listed']) or 'none'}"
        )
        print(f"   h264_cuvid (NVDEC): {probe['h264_cuvid']}")
        print(f"   h264_nvenc (NVENC): {probe['h264_nvenc']}")
