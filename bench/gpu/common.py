"""The plan, the context every section gets, and the small helpers they share."""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from devkit import photos
from inference.dctnet import GeneratorRunner, load_generator
from inference.models import choose_dtype
from inference.weights import StyleWeights
from service.factory import loaded_engine
from service.settings import Settings
from serving.gpu_codec import GpuCodec

TARGET_PASSES_PER_S = 1000.0
TARGET_PHOTOS_PER_S = 300.0
#: One 720p stream through the clip flow, frames per second.
TARGET_VIDEO_FPS = 60.0
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SETTING_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
SECTIONS = (
    "env", "exactness", "generator", "graphs", "pipeline", "codec", "http", "video", "tensorrt", "compile",
)  # fmt: skip
#: What a section needs at least (seconds) to be started, and the most it may take, on the GPU (the
#: dry run: a quarter of the need, twice the cap). The caps are worst cases and add up to more than
#: the 420 s budget; a section is given at most what is left, and one that would start with less than
#: its need is skipped, so the run stays within the budget whatever the sections take. ``video`` (a
#: 2 s clip, twice in each of two modes) and ``tensorrt`` (an export and up to two engine builds, each
#: in a child process stopped at the cap; nothing without the wheels) are sized by estimate, not yet
#: measured on a GPU; they come after ``http`` so they never take the headline figures' time, and
#: ``compile`` takes what is left.
NEEDS_S = {"env": 0, "exactness": 20, "generator": 20, "graphs": 15, "pipeline": 20, "codec": 5, "http": 60,
           "video": 15, "tensorrt": 30}  # fmt: skip
CAPS_S = {"env": 30, "exactness": 60, "generator": 70, "graphs": 50, "pipeline": 70, "codec": 25, "http": 110,
          "video": 45, "tensorrt": 90}  # fmt: skip
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
    #: The clip of the ``video`` section: (width, height), frames, frame rate, frames of its warm-up
    #: clip, and runs of each mode (the best is reported).
    video_size: tuple[int, int]
    video_frames: int
    video_fps: int
    video_warmup: int
    video_repeats: int
    #: The TensorRT engine's optimization profile, (min, opt, max) of (height, width), and the sizes
    #: it is run, checked and timed at.
    trt_profile: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    trt_sizes: tuple[tuple[int, int], ...]
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
            video_size=(128, 96),
            video_frames=6,
            video_fps=25,
            video_warmup=2,
            video_repeats=1,
            trt_profile=((32, 32), (64, 64), (128, 128)),
            trt_sizes=((64, 64), (32, 32)),
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
        video_size=(1280, 720),
        video_frames=48,
        video_fps=25,
        video_warmup=8,
        video_repeats=2,
        trt_profile=((256, 256), (720, 960), (1088, 1920)),
        trt_sizes=((720, 960), (288, 288)),
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
