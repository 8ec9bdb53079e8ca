"""The CUDA path proven and measured in one short run; ``bench/gpu.sh`` is the way to start it.

    bench/gpu.sh                 # on a GPU machine, at most 8 minutes; files under $OUT or bench/results/gpu/
    bench/gpu.sh --dry           # every section on the CPU with tiny sizes, to keep this script working
    python -m bench.gpu --only exactness,generator   # some sections (names below)

Sections, in this order, each timed and guarded (a failing section records its error in the JSON and
the next one runs; a section that would overrun the time budget is skipped and says so):

``env``        torch, CUDA, cuDNN, torchvision, triton, Pillow, the GPU codec's status, ``nvidia-smi``.
``exactness``  the generator on the device against CPU float32 (oneDNN) on real photo content, at
               720×960 and 288×288: share of identical bytes and largest difference in float32
               (and in float32 with TF32 allowed, what PyTorch does by default), mean and largest in
               float16 and bfloat16; the device resizes and turns against Pillow; the whole pipeline
               on the device in float32 against the CPU's, on a one-face photo.
``generator``  passes/s at 720×960 and 288×288, batch 1, 8 and 32, float32/16, bfloat16; eager,
               channels-last, ``cudnn.benchmark``; peak memory.
``graphs``     the same with the whole generator captured as a CUDA graph per shape.
``pipeline``   the whole pipeline per photo (stage breakdown) for the 1024×768 one-face photo and
               the four-face composite, per dtype; and photos/s for the worker's batch of eight.
``codec``      nvJPEG (torchvision) against Pillow: decode to the processing size and encode,
               time and difference; which sample files each path takes.
``http``       ``toonserve serve`` on the device with TOONSERVE_DTYPE=auto, 32 clients posting the
               one-face JPEG for JPEG back: photos/s, p50/p99, statuses, the Server-Timing medians,
               GPU utilisation and memory while loaded, and responses against an in-process run.
``compile``    ``torch.compile`` (reduce-overhead; max-autotune-no-cudagraphs) at fixed shapes, in a
               child process given what is left of the budget: compile time apart, passes/s, bytes
               against eager. Last, because compiling is slow and optional.

Targets are printed next to the figures, never asserted: ≥ 1,000 background passes/s at 720×960 in
half precision with batching, and ≥ 300 photos/s end to end through HTTP with JPEG output.

``--dry`` runs every section on the CPU (the device runs the ``eager`` backend CUDA uses, against
the CPU's ``onednn``), with 64×64/32×32 images, batches of 1–2, a handful of requests, a stand-in
for CUDA graphs, dynamo without Inductor for ``compile``, and the codec through a Pillow stand-in for
torchvision (``devkit/pillow_tvio.py``). Its figures only show the script works.

Exit status: 0; 1 if a section failed, including a claim it checks that does not hold (float32 on
the device within a level of the CPU's, the device's resizes and turns giving Pillow's bytes, every
HTTP answer like the in-process run of the same upload, at least one request served); 3 if CUDA was
wanted and is not there. The JSON says which, with tracebacks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
from PIL import Image

from devkit import photos
from devkit.pillow_tvio import PillowTorchvisionIO
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from inference import device_image
from inference.constants import STAGES
from inference.dctnet import GeneratorRunner, filtered, ieee_fp32_convolutions, load_generator, to_uint8
from inference.geometry import resize_rgb
from inference.models import choose_dtype
from inference.pipeline import Options
from inference.weights import StyleWeights, resolve
from service.factory import build_flow, loaded_engine
from service.settings import Settings
from serving.encoding import encode
from serving.gpu_codec import GpuCodec
from serving.gpu_codec import plan as decode_plan
from serving.images import decode
from serving.options import RequestOptions
from serving.scheduler import DEFAULT_QUEUE_SIZE

TARGET_PASSES_PER_S = 1000.0
TARGET_PHOTOS_PER_S = 300.0
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTING_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SECTIONS = ("env", "exactness", "generator", "graphs", "pipeline", "codec", "http", "compile")
#: What a section needs at least (seconds) to be started, and the most it may take, on the GPU.
NEEDS_S = {"env": 0, "exactness": 20, "generator": 20, "graphs": 15, "pipeline": 20, "codec": 5, "http": 60}
CAPS_S = {"env": 30, "exactness": 60, "generator": 70, "graphs": 50, "pipeline": 70, "codec": 25, "http": 110}
#: Largest mean difference (levels) between an HTTP response under load and the in-process run of the
#: same upload that is put down to batching and JPEG noise; more means something mixed images up.
HTTP_CHECK_MEAN_ABS = 3.0
#: Seconds kept free at the end for writing the results.
RESERVE_S = 8.0


@dataclass(frozen=True)
class Plan:
    """Sizes and counts of one run: the GPU's, or the dry run's tiny ones."""

    dry: bool
    device: torch.device
    budget_s: float
    gen_sizes: tuple[tuple[int, int], ...]
    batches: tuple[int, ...]
    dtypes: tuple[str, ...]
    min_time_s: float
    warmup: int
    pipeline_repeat: int
    pipeline_batch: int
    resize_cases: int
    http_requests: int
    http_concurrency: int
    http_warmup: int
    http_max_s: float
    #: (mode, dtype, (height, width), batch); the dry run's mode is dynamo with the eager backend.
    compile_configs: tuple[tuple[str, str, tuple[int, int], int], ...]


def make_plan(dry: bool, budget_s: float | None) -> Plan:
    if dry:
        return Plan(
            dry=True,
            device=torch.device("cpu"),
            budget_s=budget_s or 120.0,
            gen_sizes=((64, 64), (32, 32)),
            batches=(1, 2),
            dtypes=("fp32", "fp16", "bf16"),
            min_time_s=0.0,
            warmup=1,
            pipeline_repeat=1,
            pipeline_batch=2,
            resize_cases=8,
            http_requests=4,
            http_concurrency=2,
            http_warmup=1,
            http_max_s=60.0,
            compile_configs=(("dry: dynamo, eager backend", "fp32", (32, 32), 1),),
        )
    return Plan(
        dry=False,
        device=torch.device("cuda"),
        budget_s=budget_s or 420.0,
        gen_sizes=((720, 960), (288, 288)),
        batches=(1, 8, 32),
        dtypes=("fp32", "fp16", "bf16"),
        min_time_s=0.3,
        warmup=2,
        pipeline_repeat=5,
        pipeline_batch=8,
        resize_cases=60,
        http_requests=640,
        http_concurrency=32,
        http_warmup=64,
        http_max_s=60.0,
        compile_configs=(
            ("reduce-overhead", "fp16", (720, 960), 8),
            ("max-autotune-no-cudagraphs", "fp16", (720, 960), 8),
            ("reduce-overhead", "fp16", (288, 288), 32),
            ("max-autotune-no-cudagraphs", "fp16", (288, 288), 32),
            ("reduce-overhead", "bf16", (720, 960), 8),
            ("reduce-overhead", "fp32", (720, 960), 8),
        ),
    )


@dataclass
class Context:
    """What the sections share: the plan, the synthetic model, photos, engines, the codec."""

    plan: Plan
    out: Path
    tmp: Path
    weights: StyleWeights
    photos: dict[str, np.ndarray]
    started: float = field(default_factory=time.monotonic)
    engines: dict[tuple[str, str, str], Any] = field(default_factory=dict)
    codec: GpuCodec | None = None
    codec_why: str = ""
    results: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.plan.device

    @property
    def label(self) -> str:
        """How rows name the device under test: the GPU, or the CPU's eager backend in a dry run."""
        return "cpu eager (dry)" if self.plan.dry else "cuda"

    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.started)

    def settings(self, device: str, dtype: str, **extra: Any) -> Settings:
        return Settings(
            model_dir=self.tmp / "models",
            cache_dir=self.tmp / "cache",
            allow_download=False,
            device=device,
            dtype=dtype,
            styles=["anime"],
            default_style="anime",
            **extra,
        )

    def engine(self, device: str, dtype: str, backend: str = "auto") -> Any:
        """A loaded engine, built once per (device, dtype, backend) and closed at the end."""
        # "auto" resolves as the service resolves it, so the engine of that dtype is shared.
        key = (device, choose_dtype(dtype, torch.device(device)).name, backend)
        if key not in self.engines:
            self.engines[key] = loaded_engine(self.settings(device, dtype, backend=backend))
        return self.engines[key]

    def close(self) -> None:
        for engine in self.engines.values():
            engine.close(drain=False)
        self.engines.clear()


# -- small helpers ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(fn: Callable[[], Any], per_call: int, device: torch.device, plan: Plan) -> tuple[float, float]:
    """(images/s, ms per call) of ``fn`` after ``plan.warmup`` calls: calls in doubling chunks,
    synchronised between chunks, until ``plan.min_time_s`` has passed."""
    for _ in range(plan.warmup):
        fn()
    sync(device)
    calls, chunk = 0, 1
    start = time.perf_counter()
    while True:
        for _ in range(chunk):
            fn()
        calls += chunk
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= plan.min_time_s:
            return calls * per_call / elapsed, elapsed / calls * 1000
        chunk = min(chunk * 2, 64)


def compare(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    d = np.abs(out.astype(np.int16) - ref.astype(np.int16))
    return dict(
        identical_pct=round(100.0 * float((d == 0).mean()), 4),
        max_abs=int(d.max()),
        mean_abs=round(float(d.mean()), 4),
        p99_abs=float(np.percentile(d, 99)),
    )


def photo_bgr(h: int, w: int) -> torch.Tensor:
    """Grace Hopper brought to h×w, BGR, as a (1, 3, h, w) uint8 tensor: real photo content."""
    rgb = np.asarray(Image.fromarray(photos.grace_hopper()).resize((w, h), Image.Resampling.BILINEAR))
    return torch.from_numpy(np.ascontiguousarray(rgb[:, :, ::-1])).permute(2, 0, 1)[None].contiguous()


def jpeg_bytes(rgb: np.ndarray, quality: int = 92, **params: Any) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=quality, **params)
    return buffer.getvalue()


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def nvidia_smi(
    query: str = "name,memory.used,memory.total,utilization.gpu,driver_version",
) -> list[dict[str, str]] | None:
    """One row per GPU from ``nvidia-smi --query-gpu``, or None where it is not available."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    keys = query.split(",")
    return [
        dict(zip(keys, (v.strip() for v in line.split(",")), strict=False))
        for line in out.splitlines()
        if line
    ]


@contextlib.contextmanager
def tf32_allowed() -> Iterator[None]:
    """cuDNN's float32 convolutions in TF32, PyTorch's default on GPUs with it (to show what it costs);
    the legacy flag, as :func:`inference.dctnet.ieee_fp32_convolutions` uses."""
    allowed = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = allowed


@contextlib.contextmanager
def cudnn_benchmark(on: bool = True) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def runner(ctx: Context, dtype: str, backend: str = "eager") -> GeneratorRunner:
    """The background generator on the device under test (the eager backend: what CUDA runs)."""
    return GeneratorRunner(load_generator(ctx.weights.bg, ctx.device, DTYPES[dtype]), backend=backend)


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    """Print an aligned table (side by side columns; numbers right-aligned)."""
    cells = [[str(c) for c in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n== {title}")
    for k, row in enumerate(cells):
        print(
            "  ".join(
                c.rjust(w) if k and _numeric(c) else c.ljust(w) for c, w in zip(row, widths, strict=True)
            )
        )
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"
    return str(value)


def _numeric(text: str) -> bool:
    try:
        float(text.rstrip("%x"))
    except ValueError:
        return False
    return True


# -- env ----------------------------------------------------------------------------------------------


def section_env(ctx: Context, deadline: float) -> dict[str, Any]:
    env: dict[str, Any] = dict(
        dry=ctx.plan.dry,
        python=platform.python_version(),
        torch=torch.__version__,
        cuda_build=torch.version.cuda,
        cuda_available=torch.cuda.is_available(),
        device=str(ctx.device),
        cpus=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        pillow=PIL.__version__,
        pillow_pass_order=device_image.pillow_pass_order(),
        budget_s=ctx.plan.budget_s,
    )
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(
            gpu=props.name,
            capability=".".join(map(str, torch.cuda.get_device_capability(ctx.device))),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
    for module in ("torchvision", "triton"):
        try:
            env[module] = __import__(module).__version__
        except Exception as exc:  # a torchvision built for another torch fails in many ways
            env[module] = f"not importable ({type(exc).__name__}: {exc})"[:200]
    ctx.codec, ctx.codec_why = GpuCodec.try_create(ctx.device)
    env["gpu_codec"] = (
        f"nvJPEG via torchvision {ctx.codec.version}" if ctx.codec else f"Pillow: {ctx.codec_why}"
    )
    env["nvidia_smi"] = nvidia_smi()
    table("environment", ["what", "value"], [[k, v] for k, v in env.items() if k != "nvidia_smi"])
    if env["nvidia_smi"]:
        table("nvidia-smi", list(env["nvidia_smi"][0]), [list(r.values()) for r in env["nvidia_smi"]])
    return env


# -- exactness ----------------------------------------------------------------------------------------


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
    # parity rule of tests/inference/test_dctnet.py), and the device's resizes and turns Pillow's bytes.
    fp32 = [r for r in figures.get("generator") or [] if r["what"] == f"{ctx.label} fp32"]
    if fp32 and not all(r["max_abs"] <= 1 and r["identical_pct"] >= 99.9 for r in fp32):
        errors.append(f"float32 on the device is not within one level of the CPU's: {fp32}")
    resize = figures.get("device_resize")
    if resize and (resize["identical"] < resize["resizes"] or resize["turns_identical"] < resize["turns"]):
        errors.append(f"the device's resizes or turns are not Pillow's bytes: {resize}")
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
    """The device resizes (both filters, real sizes and random ones) and turns against Pillow."""
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
        pillow_pass_order=device_image.pillow_pass_order(),
    )
    table(
        "exactness: resizes and EXIF turns on the device vs Pillow",
        ["what", "cases", "identical", "max |Δ|"],
        [
            ["resize (box/bilinear)", len(cases), identical, worst],
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


# -- generator throughput -----------------------------------------------------------------------------


def _configs(ctx: Context) -> Iterator[tuple[tuple[int, int], int, str]]:
    for size in ctx.plan.gen_sizes:
        for batch in ctx.plan.batches:
            for dtype in ctx.plan.dtypes:
                yield size, batch, dtype


def section_generator(ctx: Context, deadline: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    runners = {name: runner(ctx, name) for name in ctx.plan.dtypes}
    with cudnn_benchmark():
        for (h, w), batch, dtype in _configs(ctx):
            row: dict[str, Any] = dict(size=f"{h}x{w}", batch=batch, dtype=dtype, mode="eager")
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "time budget"})
                continue
            x = photo_bgr(h, w).expand(batch, -1, -1, -1).contiguous().to(ctx.device)
            reset_peak(ctx.device)
            try:
                gen = runners[dtype]
                rate, ms = throughput(lambda gen=gen, x=x: gen(x), batch, ctx.device, ctx.plan)
                row.update(
                    passes_per_s=round(rate, 1), ms_per_call=round(ms, 2), peak_gib=peak_gib(ctx.device)
                )
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
            except Exception as exc:  # one configuration fails, the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            del x
    _print_rates(ctx, "generator, eager: passes/s (channels-last, cudnn.benchmark)", rows)
    return _with_errors(rows)


def _with_errors(rows: list[dict[str, Any]], **figures: Any) -> dict[str, Any]:
    """A section's figures; with an ``error`` (the section then counts as failed) if some
    configurations failed, their rows saying how."""
    failed = [r for r in rows if "error" in r]
    if failed:
        figures["error"] = f"{len(failed)} of {len(rows)} configurations failed; first: {failed[0]['error']}"
    return dict(rows=rows, **figures)


def _print_rates(ctx: Context, title: str, rows: list[dict[str, Any]], extra: str | None = None) -> None:
    dtypes = list(ctx.plan.dtypes)
    by = {(r["size"], r["batch"], r["dtype"]): r for r in rows}
    out = []
    for h, w in ctx.plan.gen_sizes:
        for batch in ctx.plan.batches:
            cells: list[Any] = [f"{h}x{w}", batch]
            for d in dtypes:
                r = by.get((f"{h}x{w}", batch, d), {})
                cells.append(r.get("passes_per_s", r.get("skipped", "error" if "error" in r else None)))
            if extra:
                cells += [by.get((f"{h}x{w}", batch, d), {}).get(extra) for d in dtypes]
            out.append(cells)
    header = ["size", "batch", *dtypes] + ([f"{extra} {d}" for d in dtypes] if extra else [])
    table(title, header, out)


# -- CUDA graphs --------------------------------------------------------------------------------------


class _Replay:
    """A captured generator call: ``replay()`` reruns it on ``static_in``, output in ``static_out``."""

    def __init__(self, gen: GeneratorRunner, x: torch.Tensor, device: torch.device) -> None:
        self.static_in = x.clone()
        self.graph: Any = None
        if device.type != "cuda":  # the dry run's stand-in: nothing to capture on a CPU
            self._gen = gen
            self.static_out = gen(self.static_in)
            return
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up off the capture: cuDNN picks its algorithms here
                gen(self.static_in)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = gen(self.static_in)

    def replay(self) -> None:
        if self.graph is None:
            self.static_out = self._gen(self.static_in)
        else:
            self.graph.replay()


def section_graphs(ctx: Context, deadline: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    runners = {name: runner(ctx, name) for name in ctx.plan.dtypes}
    eager = {(r["size"], r["batch"], r["dtype"]): r for r in ctx.results.get("generator", {}).get("rows", [])}
    mode = "cuda graph" if ctx.device.type == "cuda" else "stand-in (no CUDA graphs on a CPU)"
    with cudnn_benchmark():
        for (h, w), batch, dtype in _configs(ctx):
            row: dict[str, Any] = dict(size=f"{h}x{w}", batch=batch, dtype=dtype, mode=mode)
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "time budget"})
                continue
            x = photo_bgr(h, w).expand(batch, -1, -1, -1).contiguous().to(ctx.device)
            try:
                gen = runners[dtype]
                reference = gen(x).cpu().numpy()
                start = time.perf_counter()
                replay = _Replay(gen, x, ctx.device)
                sync(ctx.device)
                row["capture_ms"] = round((time.perf_counter() - start) * 1000, 1)
                rate, ms = throughput(replay.replay, batch, ctx.device, ctx.plan)
                replay.replay()
                stats = compare(replay.static_out.cpu().numpy(), reference)
                eager_rate = eager.get((row["size"], batch, dtype), {}).get("passes_per_s")
                row.update(
                    passes_per_s=round(rate, 1),
                    ms_per_call=round(ms, 2),
                    vs_eager=round(rate / eager_rate, 2) if eager_rate else None,
                    identical_to_eager_pct=stats["identical_pct"],
                    max_abs_vs_eager=stats["max_abs"],
                )
                del replay
            except torch.OutOfMemoryError:
                row["skipped"] = "out of memory"
            except Exception as exc:  # a capture that fails; the others still run
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            del x
            if ctx.device.type == "cuda":
                torch.cuda.empty_cache()
    _print_rates(ctx, f"generator, {mode}: passes/s, and × eager", rows, extra="vs_eager")
    same = [r["identical_to_eager_pct"] for r in rows if "identical_to_eager_pct" in r]
    print(f"   bytes identical to eager: min {min(same) if same else '-'} %")
    return _with_errors(rows)


# -- torch.compile (in a child process) ---------------------------------------------------------------


def section_compile(ctx: Context, deadline: float) -> dict[str, Any]:
    spec = dict(
        dry=ctx.plan.dry,
        device=str(ctx.device),
        weights=str(ctx.weights.bg),
        configs=ctx.plan.compile_configs,
        out=str(ctx.tmp / "compile-part.json"),
        warmup=ctx.plan.warmup,
        min_time_s=ctx.plan.min_time_s,
    )
    spec_path = ctx.tmp / "compile-spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(str(spec["out"])).unlink(missing_ok=True)
    # A fresh Inductor cache: the compile times are those of a first start.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(ctx.tmp / "inductor"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.gpu", "--compile-worker", str(spec_path)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],  # the repository root: bench and devkit are packages there
        start_new_session=True,
    )
    stopped = None
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stopped = "the time budget ran out; configurations not reached are missing"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the worker and the compile workers it started
        proc.wait()
    part = Path(str(spec["out"]))
    rows = json.loads(part.read_text()) if part.exists() else []
    error = None
    if proc.returncode != 0 and not stopped:  # a crash: keep the rows it finished, and say so
        error = f"the compile worker exited with status {proc.returncode} after {len(rows)} configuration(s)"
    table(
        "torch.compile (dynamic=False, one shape each; compile time apart)",
        [
            "mode",
            "dtype",
            "size",
            "batch",
            "compile s",
            "passes/s",
            "eager",
            "× eager",
            "identical %",
            "max |Δ|",
        ],
        [
            [
                r["mode"],
                r["dtype"],
                r["size"],
                r["batch"],
                r.get("compile_s"),
                r.get("passes_per_s"),
                r.get("eager_passes_per_s"),
                r.get("vs_eager"),
                r.get("identical_to_eager_pct"),
                r.get("max_abs_vs_eager"),
            ]
            for r in rows
        ],
    )
    if stopped or error:
        print(f"   {stopped or error}")
    figures = _with_errors(rows, stopped=stopped)
    if error:  # the worker itself crashed (the rows it finished are kept)
        figures["error"] = error
    return figures


def compile_worker(spec_path: Path) -> int:
    """The child of :func:`section_compile`: compile and measure each configuration, saving the rows
    after each one so that a kill at the time limit keeps the finished ones."""
    spec = json.loads(spec_path.read_text())
    device = torch.device(spec["device"])
    plan = replace(
        make_plan(spec["dry"], None), device=device, warmup=spec["warmup"], min_time_s=spec["min_time_s"]
    )
    rows: list[dict[str, Any]] = []
    # no_grad rather than inference_mode: what torch.compile supports best.
    with ieee_fp32_convolutions(), cudnn_benchmark(), torch.no_grad():
        for mode, dtype, (h, w), batch in spec["configs"]:
            row: dict[str, Any] = dict(mode=mode, dtype=dtype, size=f"{h}x{w}", batch=batch)
            try:
                gen = GeneratorRunner(
                    load_generator(Path(spec["weights"]), device, DTYPES[dtype]), backend="eager"
                )
                x = photo_bgr(h, w).expand(batch, -1, -1, -1).contiguous().to(device)

                def forward(x: torch.Tensor, gen: GeneratorRunner = gen) -> torch.Tensor:
                    return to_uint8(filtered(gen.model.unet, x, gen.dtype, gen.eps))

                if spec["dry"]:
                    compiled = torch.compile(forward, backend="eager", dynamic=False)
                else:
                    compiled = torch.compile(forward, mode=mode, dynamic=False)
                cudagraphs = mode == "reduce-overhead"

                def call(
                    compiled: Any = compiled, x: torch.Tensor = x, cudagraphs: bool = cudagraphs
                ) -> torch.Tensor:
                    if cudagraphs:
                        torch.compiler.cudagraph_mark_step_begin()
                    out: torch.Tensor = compiled(x)
                    return out

                eager_rate, _ = throughput(lambda gen=gen, x=x: gen(x), batch, device, plan)
                reference = gen(x).cpu().numpy()
                start = time.perf_counter()
                call()
                sync(device)
                row["compile_s"] = round(time.perf_counter() - start, 1)
                rate, ms = throughput(call, batch, device, plan)
                stats = compare(call().clone().cpu().numpy(), reference)
                row.update(
                    passes_per_s=round(rate, 1),
                    ms_per_call=round(ms, 2),
                    eager_passes_per_s=round(eager_rate, 1),
                    vs_eager=round(rate / eager_rate, 2),
                    identical_to_eager_pct=stats["identical_pct"],
                    max_abs_vs_eager=stats["max_abs"],
                )
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {exc}"[:500]
            rows.append(row)
            Path(spec["out"]).write_text(json.dumps(rows, indent=1))
            print(f"   compile: {row}", flush=True)
            torch._dynamo.reset()
    return 0


# -- pipeline -----------------------------------------------------------------------------------------


def section_pipeline(ctx: Context, deadline: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    # The dry run keeps to float32: the CPU's bfloat16 is emulated here and slow; float16 too.
    names = ctx.plan.dtypes if not ctx.plan.dry else ("fp32",)
    for name in names:
        if time.monotonic() > deadline:
            rows.append(dict(dtype=name, skipped="time budget"))
            continue
        try:
            rows.extend(_pipeline_rows(ctx, name))
        except Exception as exc:  # one dtype fails, the others still run
            rows.append(dict(dtype=name, error=f"{type(exc).__name__}: {exc}"[:500]))
            traceback.print_exc()
    table(
        PIPELINE_TITLE.format(ctx.label),
        ["dtype", "photo", "faces", "total", *[s[:9] for s in STAGES], "photos/s"],
        [
            [
                r["dtype"],
                r.get("photo"),
                r.get("faces"),
                r.get("total_ms", r.get("skipped", r.get("error"))),
                *[r.get("stages_ms", {}).get(s) for s in STAGES],
                r.get("photos_per_s"),
            ]
            for r in rows
        ],
    )
    return _with_errors(rows)


PIPELINE_TITLE = "whole pipeline on {}, per photo (median ms; stages as bench/pipeline.py)"


def _pipeline_rows(ctx: Context, name: str) -> list[dict[str, Any]]:
    """One dtype: each photo's median run with its stages, and the worker's batch through run_many."""
    rows: list[dict[str, Any]] = []
    c = ctx.engine(ctx.device.type, SETTING_NAMES[name]).cartoonizer("anime")
    for label, rgb in ctx.photos.items():
        if not ctx.plan.dry:
            c.run(rgb)  # warm-up (the engine's own warm-up was a 128×128 blank)
        results = [c.run(rgb) for _ in range(ctx.plan.pipeline_repeat)]
        rows.append(
            dict(
                dtype=name,
                photo=label,
                faces=results[-1].faces_stylized,
                total_ms=round(statistics.median(sum(r.timings_ms.values()) for r in results), 2),
                stages_ms={s: round(statistics.median(r.timings_ms[s] for r in results), 2) for s in STAGES},
            )
        )
    label, rgb = next(iter(ctx.photos.items()))
    items = [(rgb, Options())] * ctx.plan.pipeline_batch
    if not ctx.plan.dry:
        c.run_many(items)
    times = []
    for _ in range(max(1, ctx.plan.pipeline_repeat // 2)):
        start = time.perf_counter()
        c.run_many(items)
        times.append(time.perf_counter() - start)
    rows.append(
        dict(
            dtype=name,
            photo=f"{label} ×{ctx.plan.pipeline_batch} (run_many)",
            faces=None,
            total_ms=round(statistics.median(times) * 1000, 2),
            photos_per_s=round(ctx.plan.pipeline_batch / statistics.median(times), 2),
        )
    )
    return rows


# -- codec --------------------------------------------------------------------------------------------


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


# -- HTTP ---------------------------------------------------------------------------------------------


def _load(
    url: str, body: bytes, concurrency: int, requests: int, max_s: float, keep: int = 0
) -> dict[str, Any]:
    """The load generator of the HTTP benchmarks, asking for JPEG (imported here: httpx is needed by
    this section only)."""
    from bench.loadgen import post_load

    return post_load(url, body, concurrency, requests, max_s, data={"format": "jpeg"}, keep=keep)


class _GpuSampler(threading.Thread):
    """``nvidia-smi`` utilisation and memory every half second while the load runs."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.samples: list[tuple[float, float]] = []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            rows = nvidia_smi("utilization.gpu,memory.used")
            if not rows:
                return
            with contextlib.suppress(ValueError, KeyError):
                self.samples.append((float(rows[0]["utilization.gpu"]), float(rows[0]["memory.used"])))

    def summary(self) -> dict[str, Any] | None:
        if not self.samples:
            return None
        util = [u for u, _ in self.samples]
        return dict(
            samples=len(util),
            util_mean_pct=round(statistics.mean(util), 1),
            util_max_pct=max(util),
            memory_used_max_mib=max(m for _, m in self.samples),
        )


def section_http(ctx: Context, deadline: float) -> dict[str, Any]:

    body = jpeg_bytes(next(iter(ctx.photos.values())))
    # 32 clients from one address stand for 32 users: one client may fill the whole queue here.
    env = service_env(ctx.tmp / "models", ctx.tmp, TOONSERVE_DEVICE=ctx.device.type, TOONSERVE_DTYPE="auto",
                      TOONSERVE_STYLES="anime", TOONSERVE_DEFAULT_STYLE="anime",
                      TOONSERVE_CLIENT_QUEUE_SIZE=str(DEFAULT_QUEUE_SIZE))  # fmt: skip
    log_path = ctx.out / ("http-server-dry.log" if ctx.plan.dry else "http-server.log")
    server = LiveService(env, log_path).launch()
    url = server.url
    result: dict[str, Any] = dict(photo_bytes=len(body), server_log=str(log_path))
    try:
        start = time.monotonic()
        server.wait_ready(max(1.0, deadline - 10 - start))
        result["readyz"] = json.loads(server.get("/readyz")[1])
        result["ready_s"] = round(time.monotonic() - start, 1)
        plan = ctx.plan
        _load(url, body, plan.http_concurrency, plan.http_warmup, plan.http_max_s)  # warm-up
        sampler = _GpuSampler()
        if ctx.device.type == "cuda":
            sampler.start()
        max_s = min(plan.http_max_s, max(5.0, deadline - time.monotonic() - 20))
        load = _load(url, body, plan.http_concurrency, plan.http_requests, max_s, keep=2)
        sampler.stop.set()
        result["gpu_while_loaded"] = sampler.summary()
        result["nvidia_smi_after"] = nvidia_smi()
    finally:
        server.stop()
    bodies = load.pop("bodies")
    result.update(load)
    result["check"] = _http_check(ctx, body, bodies)
    target = "dry run" if ctx.plan.dry else f"≥ {TARGET_PHOTOS_PER_S:.0f}"
    readyz = result.get("readyz", {})
    table(
        f"HTTP POST /cartoonize: one-face JPEG in, JPEG out, {plan.http_concurrency} clients, "
        f"dtype {readyz.get('dtype')} (auto), max_batch default",
        ["requests", "ok", "photos/s", "target", "p50 ms", "p99 ms", "statuses", "GPU util mean/max %"],
        [
            [
                load["requests"],
                load["ok"],
                load["photos_per_s"],
                target,
                load["p50_ms"],
                load["p99_ms"],
                load["statuses"],
                _util(result["gpu_while_loaded"]),
            ]
        ],
    )
    table(
        "HTTP: Server-Timing medians (ms)",
        list(load["server_timing_median_ms"]),
        [list(load["server_timing_median_ms"].values())],
    )
    print(f"   responses vs an in-process run of the same upload: {result['check']}")
    # Fail loudly on what no figure makes good: nothing served, or answers unlike the same work done
    # in process (beyond a batch's float16 rounding and JPEG noise: a race between threads or streams).
    if not load["ok"]:
        result["error"] = f"no request succeeded: {load['statuses']}"
    elif result["check"].get("worst_mean_abs", 0) > HTTP_CHECK_MEAN_ABS:
        result["error"] = f"responses differ from the in-process run: {result['check']}"
    return result


def _util(summary: dict[str, Any] | None) -> str | None:
    return None if summary is None else f"{summary['util_mean_pct']}/{summary['util_max_pct']}"


def _http_check(ctx: Context, body: bytes, bodies: list[bytes]) -> dict[str, Any]:
    """Responses from under load against the same upload through an in-process flow (same device,
    dtype auto): a race between threads or streams would show as large differences."""
    if not bodies:
        return dict(error="no successful response to check")
    settings = ctx.settings(ctx.device.type, "auto")
    engine = ctx.engine(ctx.device.type, "auto")
    flow = build_flow(settings, engine)
    try:
        outcome = asyncio.run(flow.run(body, flow.options(RequestOptions(format="jpeg"))))
    finally:
        flow.close()
    reference = np.asarray(Image.open(io.BytesIO(outcome.data)).convert("RGB"))
    diffs = [compare(np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), reference) for b in bodies]
    return dict(
        responses=len(diffs),
        worst_mean_abs=max(d["mean_abs"] for d in diffs),
        worst_max_abs=max(d["max_abs"] for d in diffs),
    )


# -- the run ------------------------------------------------------------------------------------------


RUNNERS: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "env": section_env,
    "exactness": section_exactness,
    "generator": section_generator,
    "graphs": section_graphs,
    "pipeline": section_pipeline,
    "codec": section_codec,
    "http": section_http,
    "compile": section_compile,
}


def _targets(ctx: Context) -> dict[str, Any]:
    """The best half-precision batched 720×960 background rate, and the HTTP rate, against the targets."""
    rates = []
    for name in ("generator", "graphs"):
        for r in ctx.results.get(name, {}).get("rows", []):
            if (
                r.get("dtype") in ("fp16", "bf16")
                and r.get("batch", 1) > 1
                and r.get("size") == "720x960"
                and "passes_per_s" in r
            ):
                rates.append((r["passes_per_s"], f"{r['dtype']} batch {r['batch']} {r['mode']}"))
    for r in ctx.results.get("compile", {}).get("rows", []):
        if r.get("dtype") in ("fp16", "bf16") and r.get("size") == "720x960" and "passes_per_s" in r:
            rates.append((r["passes_per_s"], f"{r['dtype']} batch {r['batch']} compile {r['mode']}"))
    best = max(rates, default=None)
    http = ctx.results.get("http", {}).get("photos_per_s")
    out = dict(
        background_passes_per_s=best[0] if best else None,
        background_best=best[1] if best else None,
        background_target=TARGET_PASSES_PER_S,
        http_photos_per_s=http,
        http_target=TARGET_PHOTOS_PER_S,
    )
    if ctx.plan.dry:
        print("\n== targets: not applicable to a dry run (tiny sizes on a CPU)")
        return out
    table(
        "targets (printed, not asserted)",
        ["what", "measured", "target", "met"],
        [
            [
                "background passes/s, 720x960, fp16/bf16, batched",
                best[0] if best else None,
                f"≥ {TARGET_PASSES_PER_S:.0f}",
                _met(best[0] if best else None, TARGET_PASSES_PER_S),
            ],
            [
                "photos/s through HTTP, JPEG out, 32 clients",
                http,
                f"≥ {TARGET_PHOTOS_PER_S:.0f}",
                _met(http, TARGET_PHOTOS_PER_S),
            ],
        ],
    )
    if best:
        print(f"   best background configuration: {best[1]}")
    return out


def _what_helps(ctx: Context) -> list[dict[str, Any]]:
    """Each way of running the generator against eager, over the configurations both measured:
    the median and best ratio of passes/s, and where the best was (the answer to "which helps")."""
    modes: dict[str, list[tuple[float, str]]] = {}
    rows = ctx.results.get("graphs", {}).get("rows", []) + ctx.results.get("compile", {}).get("rows", [])
    for r in rows:
        if r.get("vs_eager"):
            name = r["mode"] if r["mode"].startswith(("cuda graph", "stand-in")) else f"compile {r['mode']}"
            modes.setdefault(name, []).append((r["vs_eager"], f"{r['dtype']} {r['size']} batch {r['batch']}"))
    verdict = [
        dict(
            mode=name,
            configurations=len(ratios),
            median_vs_eager=round(statistics.median(v for v, _ in ratios), 2),
            best_vs_eager=max(ratios)[0],
            best_at=max(ratios)[1],
            worst_vs_eager=min(ratios)[0],
        )
        for name, ratios in modes.items()
    ]
    if verdict:
        table(
            "what helps: passes/s against eager (× eager; > 1 helps)",
            ["mode", "configs", "median ×", "best ×", "best at", "worst ×"],
            [[v["mode"], v["configurations"], v["median_vs_eager"], v["best_vs_eager"], v["best_at"],
              v["worst_vs_eager"]] for v in verdict],
        )  # fmt: skip
    return verdict


def _met(value: float | None, target: float) -> str:
    return "-" if value is None else "yes" if value >= target else "no"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="every section on the CPU, tiny sizes and counts")
    ap.add_argument(
        "--out", type=Path, default=Path("bench/results/gpu"), help="folder for the JSON and logs"
    )
    ap.add_argument(
        "--budget-s", type=float, default=None, help="time budget of the sections (default 420 s; dry 120 s)"
    )
    ap.add_argument("--only", default="", help=f"comma-separated sections of {', '.join(SECTIONS)}")
    ap.add_argument("--compile-worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_worker is not None:
        return compile_worker(args.compile_worker)
    if not args.dry and not torch.cuda.is_available():
        print(
            f"error: CUDA was requested but is not available (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run with --dry for the CPU check",
            file=sys.stderr,
        )
        return 3
    only = [s for s in args.only.split(",") if s] or list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown section(s) {unknown}; known: {', '.join(SECTIONS)}")
    plan_ = make_plan(args.dry, args.budget_s)
    if args.dry:
        # The dry run is for small shared CPUs: with two OpenMP threads and the other core busy, a
        # 32×32 generator call took 300 ms instead of 4 (threads spinning at barriers); one thread
        # per process (this one, the server, the compile worker) keeps it quick and steady.
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / ("gpu-dry.json" if args.dry else "gpu.json")
    report: dict[str, Any] = dict(
        dry=args.dry, plan={k: str(v) for k, v in asdict(plan_).items()}, sections={}
    )

    def save() -> None:
        tmp_json = json_path.with_suffix(".json.tmp")
        tmp_json.write_text(json.dumps(report, indent=1, default=str))
        tmp_json.replace(json_path)

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-gpu-"))
    failed = False
    ctx: Context | None = None
    try:
        write_fast_model_dir(tmp / "models" / "anime")
        weights = resolve("anime", tmp / "cache", tmp / "models", allow_download=False)
        if args.dry:
            small = np.asarray(
                Image.fromarray(photos.one_face_1024x768()).resize((256, 192), Image.Resampling.BILINEAR)
            )
            shots = {"1 face 256x192": small, "4 faces 288x192": photos.group(4, tile=96)}
        else:
            shots = {"1 face 1024x768": photos.one_face_1024x768(), "4 faces 1152x768": photos.group(4)}
        ctx = Context(plan_, args.out, tmp, weights, shots)
        for name in SECTIONS:
            if name not in only:
                continue
            left = ctx.left() - RESERVE_S
            needs = NEEDS_S.get(name, 60) / (4 if args.dry else 1)
            if left < needs:
                report["sections"][name] = dict(
                    status="skipped", reason=f"{left:.0f} s left of the budget, needs {needs:.0f}"
                )
                print(f"\n== {name}: skipped ({report['sections'][name]['reason']})")
                save()
                continue
            cap = CAPS_S.get(name, left)
            deadline = time.monotonic() + min(left, cap * (2 if args.dry else 1))
            start = time.monotonic()
            try:
                figures = RUNNERS[name](ctx, deadline)
                ctx.results[name] = figures
                # A section may keep its figures and still report an error (a crashed child process).
                status = "error" if figures.get("error") else "ok"
                failed = failed or status == "error"
                seconds = round(time.monotonic() - start, 1)
                report["sections"][name] = dict(status=status, seconds=seconds, **figures)
            except Exception as exc:
                failed = True
                tb = traceback.format_exc()
                report["sections"][name] = dict(
                    status="error",
                    seconds=round(time.monotonic() - start, 1),
                    error=f"{type(exc).__name__}: {exc}",
                    traceback=tb[-4000:],
                )
                print(f"\n== {name}: FAILED: {type(exc).__name__}: {exc}\n{tb[-2000:]}", file=sys.stderr)
            save()
        report["what_helps"] = _what_helps(ctx)
        report["targets"] = _targets(ctx)
        report["seconds"] = round(time.monotonic() - ctx.started, 1)
    except Exception as exc:
        failed = True
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()[-4000:]
        print(f"error: {report['error']}\n{report['traceback']}", file=sys.stderr)
    finally:
        if ctx is not None:
            ctx.close()
        save()
        shutil.rmtree(tmp, ignore_errors=True)
    statuses = Counter(s["status"] for s in report["sections"].values())
    print(f"\n# sections: {dict(statuses)}; {report.get('seconds', '?')} s; wrote {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
