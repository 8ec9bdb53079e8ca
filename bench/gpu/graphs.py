"""Section ``graphs``: the same passes replayed as CUDA graphs."""

from __future__ import annotations

import time
from typing import Any

import torch

from bench.gpu.common import Context, compare, cudnn_benchmark, photo_bgr, runner, sync, throughput
from bench.gpu.generator import configs, print_rates, with_errors
from inference.dctnet import GeneratorRunner


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
        for (h, w), batch, dtype in configs(ctx):
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
    print_rates(ctx, f"generator, {mode}: passes/s, and × eager", rows, extra="vs_eager")
    same = [r["identical_to_eager_pct"] for r in rows if "identical_to_eager_pct" in r]
    print(f"   bytes identical to eager: min {min(same) if same else '-'} %")
    return with_errors(rows)
