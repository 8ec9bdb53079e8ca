"""Section ``http``: the service itself, 32 clients posting photos, JPEG out."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import statistics
import threading
import time
from typing import Any

import numpy as np
from PIL import Image

from bench.gpu.common import (
    HTTP_CHECK_MEAN_ABS,
    TARGET_PHOTOS_PER_S,
    Context,
    compare,
    jpeg_bytes,
    nvidia_smi,
    table,
)
from devkit.serve import LiveService, service_env
from service.factory import build_flow
from serving.options import RequestOptions
from serving.scheduler import DEFAULT_QUEUE_SIZE


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
    readyz = result.get("readyz", {})
    result["check"] = _http_check(ctx, body, bodies, readyz.get("styles", {}).get("anime", {}))
    target = "dry run" if ctx.plan.dry else f"≥ {TARGET_PHOTOS_PER_S:.0f}"
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


def _http_check(ctx: Context, body: bytes, bodies: list[bytes], served: dict[str, Any]) -> dict[str, Any]:
    """Responses from under load against the same upload through an in-process flow on the same
    device, in the precision and on the generator backend the server reported for the style
    (``served``: its ``/readyz`` entry; ``auto`` may give a style int8, and the backend setting
    comes from the environment): a race between threads or streams would show as large differences."""
    if not bodies:
        return dict(error="no successful response to check")
    dtype, backend = served.get("dtype", "auto"), served.get("backend", "auto")
    settings = ctx.settings(ctx.device.type, dtype, backend=backend)
    engine = ctx.engine(ctx.device.type, dtype, backend)
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
