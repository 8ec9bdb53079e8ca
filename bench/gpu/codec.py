"""Section ``codec``: the GPU JPEG decoder and encoder against Pillow."""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.gpu.common import Context, compare, jpeg_bytes, sync, table
from devkit.pillow_tvio import PillowTorchvisionIO
from inference.geometry import resize_rgb
from inference.pipeline import Options
from serving.encoding import encode
from serving.gpu_codec import GpuCodec
from serving.gpu_codec import plan as decode_plan
from serving.images import decode


def _median_ms(fn: Callable[[], Any], device: torch.device, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return round(10 * math.log10(255**2 / mse), 2) if mse else float("inf")


def section_codec(ctx: Context, deadline: float) -> dict[str, Any]:
    if ctx.codec is None and not ctx.codec_why:  # the env section did not run
        ctx.codec, ctx.codec_why = GpuCodec.try_create(ctx.device)
    codec, status = ctx.codec, ctx.codec_why
    if ctx.plan.dry:
        codec, status = GpuCodec(ctx.device, PillowTorchvisionIO(), "stand-in"), "Pillow stand-in (dry run)"
    max_pixels = 40_000_000
    one_face = next(iter(ctx.photos.values()))
    big_side = (480, 640) if ctx.plan.dry else (3024, 4032)
    big = np.asarray(Image.fromarray(one_face).resize(big_side[::-1], Image.Resampling.BILINEAR))
    repeat = 3 if ctx.plan.dry else 10
    decode_rows: list[dict[str, Any]] = []
    for label, rgb in (
        (f"{one_face.shape[1]}x{one_face.shape[0]} photo", one_face),
        (f"{big.shape[1]}x{big.shape[0]} photo", big),
    ):
        data = jpeg_bytes(rgb)
        shape = Options().processing_shape(rgb.shape[:2])
        needed = (2 * shape[0], 2 * shape[1])

        def pillow(
            needed: tuple[int, int] | None = needed, data: bytes = data, shape: tuple[int, int] = shape
        ) -> np.ndarray:
            return resize_rgb(decode(data, max_pixels=max_pixels, needed=needed).pixels, *shape)

        row: dict[str, Any] = dict(photo=label, processing=f"{shape[0]}x{shape[1]}", bytes=len(data))
        row["pillow_ms"] = _median_ms(pillow, ctx.device, repeat)
        flow_pixels, full_pixels = pillow(), pillow(None)
        if codec is not None:
            got = codec.decode(data, shape, max_pixels=max_pixels)
            if got is None:
                row["gpu"] = f"went to Pillow: {dict(codec.counts)}"
            else:
                row["gpu_ms"] = _median_ms(
                    lambda data=data, shape=shape: codec.decode(data, shape, max_pixels=max_pixels),
                    ctx.device,
                    repeat,
                )
                host = got.cpu().numpy()
                row["vs_pillow_flow"] = compare(host, flow_pixels)
                row["vs_pillow_full_decode"] = compare(host, full_pixels)
        decode_rows.append(row)
    image = one_face
    pillow_bytes = encode(image, "jpeg", 90)
    encode_row: dict[str, Any] = dict(
        image=f"{image.shape[1]}x{image.shape[0]}",
        quality=90,
        pillow_ms=_median_ms(lambda: encode(image, "jpeg", 90), ctx.device, repeat),
        pillow_bytes=len(pillow_bytes),
        pillow_psnr=_psnr(np.asarray(Image.open(io.BytesIO(pillow_bytes))), image),
    )
    if codec is not None:
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous().to(ctx.device)
        gpu_bytes = codec.encode(tensor, 90)
        if gpu_bytes is not None:
            encode_row.update(
                gpu_ms=_median_ms(lambda: codec.encode(tensor, 90), ctx.device, repeat),
                gpu_bytes=len(gpu_bytes),
                gpu_psnr=_psnr(np.asarray(Image.open(io.BytesIO(gpu_bytes)).convert("RGB")), image),
            )
    exif = Image.Exif()
    exif[0x0112] = 6
    samples = {
        "baseline 4:2:0": jpeg_bytes(one_face),
        "baseline 4:4:4": jpeg_bytes(one_face, subsampling=0),
        "EXIF orientation 6": jpeg_bytes(one_face, exif=exif),
        "progressive": jpeg_bytes(one_face, progressive=True),
        "greyscale": jpeg_bytes(one_face[:, :, 0]),
        "truncated": jpeg_bytes(one_face)[:5000],
    }
    rules = {}
    for name, data in samples.items():
        how = decode_plan(data, max_pixels=max_pixels)
        rules[name] = (
            f"Pillow: {how}"
            if isinstance(how, str)
            else f"GPU (turn: {how.turn.name if how.turn else 'none'})"
        )
    decoder = status or (f"nvJPEG via torchvision {codec.version}" if codec else "?")
    table(
        f"codec: decode to the processing size ({decoder})",
        ["photo", "processing", "Pillow ms", "GPU ms", "Δ vs flow mean/max", "Δ vs full decode mean/max"],
        [
            [
                r["photo"],
                r["processing"],
                r["pillow_ms"],
                r.get("gpu_ms", r.get("gpu")),
                _pair(r.get("vs_pillow_flow")),
                _pair(r.get("vs_pillow_full_decode")),
            ]
            for r in decode_rows
        ],
    )
    table(
        "codec: JPEG encode, quality 90",
        ["image", "Pillow ms", "Pillow bytes", "Pillow PSNR", "GPU ms", "GPU bytes", "GPU PSNR"],
        [
            [
                encode_row["image"],
                encode_row["pillow_ms"],
                encode_row["pillow_bytes"],
                encode_row["pillow_psnr"],
                encode_row.get("gpu_ms"),
                encode_row.get("gpu_bytes"),
                encode_row.get("gpu_psnr"),
            ]
        ],
    )
    table("codec: which decoder takes which file", ["file", "decoder"], [[k, v] for k, v in rules.items()])
    return dict(
        codec=decoder,
        decode=decode_rows,
        encode=encode_row,
        rules=rules,
        counts=dict(codec.counts) if codec else None,
    )


def _pair(stats: dict[str, Any] | None) -> str | None:
    return None if stats is None else f"{stats['mean_abs']}/{stats['max_abs']}"
