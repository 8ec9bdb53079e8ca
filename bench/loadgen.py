"""Concurrent POST /cartoonize load for the HTTP benchmarks (``http_load``, ``request``, ``gpu``)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter, deque
from typing import Any

import httpx
import numpy as np

from devkit.serve import server_timing


def post_load(
    url: str,
    body: bytes,
    concurrency: int,
    requests: int,
    max_s: float,
    *,
    data: dict[str, str] | None = None,
    keep: int = 0,
) -> dict[str, Any]:
    """``requests`` POSTs of the JPEG ``body`` (form fields ``data``) from ``concurrency`` client
    threads, stopping early at ``max_s``: photos/s over the wall time, latency percentiles of the 200s,
    statuses (a 503 without Retry-After, or a client-side error by its name, counted apart), the
    Server-Timing medians, and the first and last ``keep`` response bodies."""
    latencies: list[float] = []
    timings: dict[str, list[float]] = {}
    statuses: Counter[str] = Counter()
    first: list[bytes] = []
    last: deque[bytes] = deque(maxlen=keep)
    lock = threading.Lock()
    counter = iter(range(requests))
    stop_at = time.monotonic() + max_s

    def client() -> None:
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < stop_at:
                with lock:
                    if next(counter, None) is None:
                        return
                start = time.perf_counter()
                try:
                    r = http.post(
                        url + "/cartoonize", files={"image": ("me.jpg", body, "image/jpeg")}, data=data
                    )
                except httpx.HTTPError as exc:
                    with lock:
                        statuses[type(exc).__name__] += 1
                    continue
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    key = str(r.status_code)
                    if r.status_code == 503 and "retry-after" not in r.headers:
                        key += " without Retry-After"
                    statuses[key] += 1
                    if r.status_code != 200:
                        continue
                    latencies.append(elapsed)
                    if len(first) < keep:
                        first.append(r.content)
                    elif keep:
                        last.append(r.content)
                    for name, ms in server_timing(r.headers.get("server-timing", "")).items():
                        timings.setdefault(name, []).append(ms)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    lat = np.asarray(latencies) if latencies else np.asarray([float("nan")])
    return dict(
        concurrency=concurrency,
        requests=sum(statuses.values()),
        ok=len(latencies),
        statuses=dict(statuses),
        photos_per_s=len(latencies) / wall,
        wall_s=wall,
        p50_ms=float(np.percentile(lat, 50)),
        p95_ms=float(np.percentile(lat, 95)),
        p99_ms=float(np.percentile(lat, 99)),
        server_timing_median_ms={k: statistics.median(v) for k, v in timings.items()},
        bodies=first + list(last),
    )
