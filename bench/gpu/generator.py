"""Section ``generator``: generator passes per second, eager, by size, batch and dtype."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import torch

from bench.gpu.common import (
    Context,
    cudnn_benchmark,
    peak_gib,
    photo_bgr,
    reset_peak,
    runner,
    table,
    throughput,
)


def configs(ctx: Context) -> Iterator[tuple[tuple[int, int], int, str]]:
    for size in ctx.plan.gen_sizes:
        for batch in ctx.plan.batches:
            for dtype in ctx.plan.dtypes:
                yield size, batch, dtype


def section_generator(ctx: Context, deadline: float) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    runners = {name: runner(ctx, name) for name in ctx.plan.dtypes}
    with cudnn_benchmark():
        for (h, w), batch, dtype in configs(ctx):
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
    print_rates(ctx, "generator, eager: passes/s (channels-last, cudnn.benchmark)", rows)
    return with_errors(rows)


def with_errors(rows: list[dict[str, Any]], **figures: Any) -> dict[str, Any]:
    """A section's figures; with an ``error`` (the section then counts as failed) if some
    configurations failed, their rows saying how."""
    failed = [r for r in rows if "error" in r]
    if failed:
        figures["error"] = f"{len(failed)} of {len(rows)} configurations failed; first: {failed[0]['error']}"
    return dict(rows=rows, **figures)


def print_rates(ctx: Context, title: str, rows: list[dict[str, Any]], extra: str | None = None) -> None:
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
