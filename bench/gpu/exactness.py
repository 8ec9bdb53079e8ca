"""Section ``exactness``: the device's generators, resizes and pipeline against the CPU's."""

from __future__ import annotations

import traceback
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.gpu.common import Context, compare, photo_bgr, runner, table, tf32_allowed
from inference import device_image
from inference.dctnet import GeneratorRunner, filtered, load_generator, to_uint8
from inference.geometry import resize_rgb


def section_exactness(ctx: Context, deadline: float) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    errors = []
    parts = (("generator", _generator_exactness), ("device_resize", _resize_exactness))
    for key, part in (*parts, ("pipeline", _pipeline_exactness)):
        try:
            figures[key] = part(ctx)
        except Exception as exc:  # one check fails, the others still run
            figures[key] = None
            errors.append(f"{key}: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    # The claims the GPU path makes, checked where measured: float32 within a level of the CPU (the
    # parity rule of tests/inference/test_dctnet.py), the device's resizes OpenCV's bytes (by the
    # device's own arithmetic, not through the host) and its turns Pillow's.
    fp32 = [r for r in figures.get("generator") or [] if r["what"] == f"{ctx.label} fp32"]
    if fp32 and not all(r["max_abs"] <= 1 and r["identical_pct"] >= 99.9 for r in fp32):
        errors.append(f"float32 on the device is not within one level of the CPU's: {fp32}")
    resize = figures.get("device_resize")
    if resize and (
        resize["identical"] < resize["resizes"]
        or resize["turns_identical"] < resize["turns"]
        or not resize["opencv_agrees"]
    ):
        errors.append(f"the device's resizes are not OpenCV's bytes or its turns not Pillow's: {resize}")
    if errors:
        figures["error"] = "; ".join(errors)
    return figures


def _generator_exactness(ctx: Context) -> list[dict[str, Any]]:
    # On the CPU, oneDNN (auto): the port's exact mode, held to TensorFlow by tests/inference.
    reference = GeneratorRunner(load_generator(ctx.weights.bg, "cpu", torch.float32), backend="auto")
    on_device = {name: runner(ctx, name) for name in ctx.plan.dtypes}
    rows: list[dict[str, Any]] = []
    for h, w in ctx.plan.gen_sizes:
        x = photo_bgr(h, w)
        ref = reference(x).numpy()
        for name, gen in on_device.items():
            out = gen(x.to(ctx.device)).cpu().numpy()
            rows.append(dict(what=f"{ctx.label} {name}", size=f"{h}x{w}", **compare(out, ref)))
            if name == "fp32" and ctx.device.type == "cuda":
                with tf32_allowed(), torch.inference_mode():
                    xd = x.to(ctx.device)
                    out = to_uint8(filtered(gen.model.unet, xd, torch.float32, gen.eps)).cpu().numpy()
                rows.append(dict(what="cuda fp32, TF32 allowed", size=f"{h}x{w}", **compare(out, ref)))
    table(
        "exactness: generator on the device vs CPU float32 (oneDNN), real photo content",
        ["what", "size", "identical %", "max |Δ|", "mean |Δ|", "p99 |Δ|"],
        [[r["what"], r["size"], r["identical_pct"], r["max_abs"], r["mean_abs"], r["p99_abs"]] for r in rows],
    )
    return rows


def _resize_exactness(ctx: Context) -> dict[str, Any]:
    """The device resizes (both filters, real sizes and random ones) against OpenCV's on the host, and
    the turns against Pillow."""
    rng = np.random.default_rng(0)
    real = [
        ((720, 960), (768, 1024)),
        ((3024, 4032), (720, 960)),
        ((1536, 2048), (720, 960)),
        ((720, 1080), (768, 1152)),
    ]
    if ctx.plan.dry:
        real = [((72, 96), (77, 102)), ((302, 403), (72, 96))]
    cases = real + [
        (
            (int(rng.integers(1, 400)), int(rng.integers(1, 400))),
            (int(rng.integers(1, 400)), int(rng.integers(1, 400))),
        )
        for _ in range(ctx.plan.resize_cases)
    ]
    identical, worst = 0, 0
    for (h, w), (oh, ow) in cases:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        chw = torch.from_numpy(rgb).permute(2, 0, 1).to(ctx.device)
        got = device_image.resize_like_host(chw, oh, ow).permute(1, 2, 0).cpu().numpy()
        d = int(np.abs(got.astype(np.int16) - resize_rgb(rgb, oh, ow)).max())
        identical += d == 0
        worst = max(worst, d)
    turns = 0
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for method in Image.Transpose:
        got = device_image.transpose(torch.from_numpy(rgb).permute(2, 0, 1).to(ctx.device), method)
        turns += bool(
            np.array_equal(
                got.permute(1, 2, 0).cpu().numpy(), np.asarray(Image.fromarray(rgb).transpose(method))
            )
        )
    result = dict(
        resizes=len(cases),
        identical=identical,
        max_abs=worst,
        turns=len(Image.Transpose),
        turns_identical=turns,
        opencv_agrees=device_image.opencv_agrees(),
    )
    table(
        "exactness: resizes on the device vs OpenCV, EXIF turns vs Pillow",
        ["what", "cases", "identical", "max |Δ|"],
        [
            ["resize (area/linear)", len(cases), identical, worst],
            ["transpose", len(Image.Transpose), turns, "-"],
        ],
    )
    return result


def _pipeline_exactness(ctx: Context) -> dict[str, Any]:
    label, rgb = next(iter(ctx.photos.items()))
    cpu = ctx.engine("cpu", "float32").cartoonizer("anime").run(rgb)
    backend = "eager" if ctx.plan.dry else "auto"
    dev = ctx.engine(ctx.device.type, "float32", backend).cartoonizer("anime").run(rgb)
    stats = compare(dev.image, cpu.image)
    marks = [
        float(np.abs(np.asarray(a.landmarks) - np.asarray(b.landmarks)).max())
        for a, b in zip(dev.faces, cpu.faces, strict=False)
    ]
    result = dict(
        photo=label,
        faces_device=dev.faces_stylized,
        faces_cpu=cpu.faces_stylized,
        landmarks_max_px=round(max(marks), 4) if marks else None,
        **stats,
    )
    table(
        f"exactness: whole pipeline, {ctx.label} float32 vs CPU float32, {label}",
        ["faces dev/cpu", "identical %", "mean |Δ|", "p99 |Δ|", "max |Δ|", "landmarks max px"],
        [
            [
                f"{dev.faces_stylized}/{cpu.faces_stylized}",
                stats["identical_pct"],
                stats["mean_abs"],
                stats["p99_abs"],
                stats["max_abs"],
                result["landmarks_max_px"],
            ]
        ],
    )
    return result
