"""HTTP load benchmark (not named http.py: that would shadow the standard library's ``http`` for every
script in this folder): latency and throughput of POST /cartoonize against the pipeline's own rate.

    python -m bench.http_load [--dtype bfloat16] [--requests 24] [--concurrency 1,4,16] [--json ...]

Starts ``toonserve serve`` on a free loopback port with the synthetic model (the real weights cannot
be downloaded here), then in one run:

1. the pipeline alone, in this process, on the same photo and settings: images/s (the reference);
2. for each concurrency: ``--requests`` POSTs of a 1024×768 one-face JPEG from that many client
   threads: p50/p95/p99 latency, throughput, and the status codes seen (503s must carry Retry-After);
   (the reference is the same work in process: decode + pipeline + PNG encode; the pipeline alone is
   printed too);
3. while the service is saturated (16 clients), ``/healthz`` latency from a separate client.

Bounded in requests and time; talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench.loadgen import post_load
from bench.report import write_report
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from service.factory import loaded_engine
from service.settings import Settings
from serving.encoding import encode
from serving.images import decode


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def pipeline_rates(models: Path, cache: Path, dtype: str, body: bytes, n: int) -> tuple[float, float]:
    """Images/s in this process, without HTTP: the pipeline alone, and decode + pipeline + PNG encode."""
    settings = Settings(model_dir=models, cache_dir=cache, allow_download=False, device="cpu", dtype=dtype)
    engine = loaded_engine(settings)
    c = engine.cartoonizer("anime")
    rgb = decode(body, max_pixels=40_000_000).pixels
    c.run(rgb)
    start = time.perf_counter()
    for _ in range(n):
        c.run(rgb)
    alone = n / (time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(n):
        encode(c.run(decode(body, max_pixels=40_000_000).pixels).image, "png")
    with_codec = n / (time.perf_counter() - start)
    engine.close()
    return alone, with_codec


def healthz_while_saturated(url: str, body: bytes, requests: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    done = threading.Event()

    def saturate() -> None:
        result.update(post_load(url, body, 16, requests, 300))
        done.set()

    threading.Thread(target=saturate).start()
    time.sleep(1.0)
    probes: list[float] = []
    with httpx.Client(timeout=10) as http:
        while not done.is_set() and len(probes) < 500:
            t = time.perf_counter()
            http.get(url + "/healthz").raise_for_status()
            probes.append((time.perf_counter() - t) * 1000)
            time.sleep(0.02)
    done.wait(300)
    return dict(probes=len(probes), p50_ms=percentile(probes, 50), p99_ms=percentile(probes, 99),
                max_ms=max(probes) if probes else float("nan"), load=result)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--json", type=Path, default=Path("bench/results/http.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")  # our pipeline only: no TensorFlow needed
    rgb = one_face_1024x768()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=92)
    body = buf.getvalue()

    alone, reference = pipeline_rates(
        tmp / "models", tmp / "cache", args.dtype, body, max(4, args.requests // 4)
    )

    # Its clients stand for as many users (from one address): one client may fill the whole queue.
    env = service_env(
        tmp / "models",
        tmp,
        TOONSERVE_DTYPE=args.dtype,
        TOONSERVE_QUEUE_SIZE="8",
        TOONSERVE_CLIENT_QUEUE_SIZE="8",
    )
    with LiveService(env, tmp / "server.log") as server:
        rows = [post_load(server.url, body, int(c), args.requests, 600) for c in args.concurrency.split(",")]
        health = healthz_while_saturated(server.url, body, args.requests)

    print(f"# http benchmark: dtype={args.dtype}, photo 1024x768 JPEG ({len(body)} bytes), torch threads "
          f"{torch.get_num_threads()}, queue size 8")  # fmt: skip
    print(f"in process, no HTTP: pipeline alone {alone:.2f} images/s; decode + pipeline + PNG encode "
          f"{reference:.2f} images/s (the reference below)")  # fmt: skip
    print(
        f"{'clients':>7} {'ok':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'img/s':>6} "
        f"{'vs pipeline':>11}  statuses"
    )
    for r in rows:
        print(f"{r['concurrency']:>7} {r['ok']:>4} {r['p50_ms']:8.0f} {r['p95_ms']:8.0f} {r['p99_ms']:8.0f} "
              f"{r['photos_per_s']:6.2f} {r['photos_per_s'] / reference:10.0%}  {r['statuses']}")  # fmt: skip
    print(f"/healthz while 16 clients saturate: {health['probes']} probes, p50 {health['p50_ms']:.1f} ms, "
          f"p99 {health['p99_ms']:.1f} ms, max {health['max_ms']:.1f} ms")  # fmt: skip
    print(f"  saturating load statuses: {health['load']['statuses']}")
    write_report(args.json, dict(pipeline_images_per_s=reference, rows=rows, healthz=health))
    return 0


if __name__ == "__main__":
    sys.exit(main())
