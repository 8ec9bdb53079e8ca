"""Section ``compile``: ``torch.compile`` in a child process (first-start compile times included)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.gpu.common import (
    DTYPES,
    Context,
    compare,
    cudnn_benchmark,
    make_plan,
    photo_bgr,
    sync,
    table,
    throughput,
)
from bench.gpu.generator import with_errors
from inference.dctnet import GeneratorRunner, filtered, ieee_fp32_convolutions, load_generator, to_uint8


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
        cwd=Path(__file__).resolve().parents[2],  # the repository root: bench and devkit are packages there
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
    figures = with_errors(rows, stopped=stopped)
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
