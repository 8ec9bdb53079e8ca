"""Section ``pipeline``: the whole pipeline per photo, stage by stage."""

from __future__ import annotations

import statistics
import time
import traceback
from typing import Any

from bench.gpu.common import SETTING_NAMES, Context, table
from bench.gpu.generator import with_errors
from inference.constants import STAGES
from inference.pipeline import Options


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
    return with_errors(rows)


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
