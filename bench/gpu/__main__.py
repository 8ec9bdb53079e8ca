"""The run: every section within its time, the targets checked, a table and JSON at the end."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bench.gpu.codec import section_codec
from bench.gpu.common import (
    CAPS_S,
    NEEDS_S,
    RESERVE_S,
    SECTIONS,
    TARGET_PASSES_PER_S,
    TARGET_PHOTOS_PER_S,
    TARGET_VIDEO_FPS,
    Context,
    make_plan,
    table,
)
from bench.gpu.compiled import compile_worker, section_compile
from bench.gpu.environment import section_env
from bench.gpu.exactness import section_exactness
from bench.gpu.generator import section_generator
from bench.gpu.graphs import section_graphs
from bench.gpu.http import section_http
from bench.gpu.pipeline import section_pipeline
from bench.gpu.tensorrt_engine import section_tensorrt
from bench.gpu.video import section_video
from devkit import photos
from devkit.reference_graphs import write_fast_model_dir
from inference.weights import resolve

RUNNERS: dict[str, Callable[[Context, float], dict[str, Any]]] = {
    "env": section_env,
    "exactness": section_exactness,
    "generator": section_generator,
    "graphs": section_graphs,
    "pipeline": section_pipeline,
    "codec": section_codec,
    "http": section_http,
    "video": section_video,
    "tensorrt": section_tensorrt,
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
    # The clip flow's default (steadied), one stream.
    steady = [r for r in ctx.results.get("video", {}).get("rows", []) if r.get("mode") == "steady"]
    video = steady[0].get("frames_per_s") if steady else None
    out = dict(
        background_passes_per_s=best[0] if best else None,
        background_best=best[1] if best else None,
        background_target=TARGET_PASSES_PER_S,
        http_photos_per_s=http,
        http_target=TARGET_PHOTOS_PER_S,
        video_frames_per_s=video,
        video_target=TARGET_VIDEO_FPS,
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
            [
                "frames/s of a 720p clip through the clip flow, steadied, one stream",
                video,
                f"≥ {TARGET_VIDEO_FPS:.0f}",
                _met(video, TARGET_VIDEO_FPS),
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
    ap = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=sys.modules["bench.gpu"].__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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
