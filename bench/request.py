"""One request end to end, with the default settings, against the TensorFlow graph it replaces.

    python -m bench.request [--requests 12] [--json bench/results/request.json]

In one run, on this machine:

1. **the reference**: the official graph's background pass as TensorFlow runs it (a frozen graph
   built like the official exporter, random weights) on a 720×960 image — the work the seed's users
   wait for per photo, without its face detector: median of ``--requests`` passes;
2. **the bare generator pass** of our background generator at the same size and the dtype the
   service picks (``TOONSERVE_DTYPE=auto``), and the pipeline's own stages on the same photo, so the
   background stage can be compared with the bare pass (target: within 1.1×) and detection timed
   (target: ≤ 25 ms);
3. **one request through HTTP**: ``toonserve serve`` with default settings on a free loopback port,
   a 1024×768 one-face JPEG in, PNG out; the median of ``--requests`` sequential requests (target:
   ≤ 0.5× the reference), with the server's own Server-Timing breakdown, and the time spent outside
   the two generator passes (the request's latency less its ``background`` and ``head`` stages; what
   is left besides every timed stage is HTTP and the route). Every upload is the same pixels with its
   own JPEG comment, so that each is new to the result cache and the models run for it (the same
   bytes again would be answered from the cache: strength, resize and encode only);
4. **throughput at concurrency 4** (photos/s), against 1 / the sequential median, distinct uploads
   too (the same upload from four clients at once would be shared while in flight).

Also PNG encode time and size at every level for the result (the ``TOONSERVE_PNG_COMPRESSION``
choice), ours (:mod:`serving.encoding`, libvips) beside Pillow's at the same zlib level. Prints a
table, writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image

from bench.report import write_report
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import TFGenerator, build_generator_pb, write_fast_model_dir
from devkit.serve import LiveService, server_timing, service_env
from inference.geometry import resize_rgb
from inference.models import choose_dtype
from inference.pipeline import Options
from service.factory import loaded_engine
from service.settings import Settings
from serving.encoding import MAX_PNG_COMPRESSION, MIN_PNG_COMPRESSION, PNG_WRITES, encode

#: write_fast_model_dir draws the background generator's weights from this seed (its default).
BG_SEED = 2
#: The stages that are generator passes; everything else a request spends is what issue 20 part 6
#: brings down.
GENERATOR_STAGES = ("background", "head")


def distinct_jpegs(rgb: np.ndarray, count: int) -> list[bytes]:
    """``count`` JPEGs of the same pixels, each with its own comment: new photos to the result cache."""
    out = []
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=92, comment=f"request {i}".encode())
        out.append(buf.getvalue())
    return out


def concurrent_photos_per_s(url: str, bodies: list[bytes], concurrency: int) -> float:
    """Photos/s of POSTing every body once from ``concurrency`` client threads."""

    def post(body: bytes) -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            r = client.post("/cartoonize", files={"image": ("me.jpg", body, "image/jpeg")})
            r.raise_for_status()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(post, bodies))
    return len(bodies) / (time.perf_counter() - start)


def median_ms(fn: Any, n: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=12)
    ap.add_argument("--json", type=Path, default=Path("bench/results/request.json"))
    args = ap.parse_args()
    n = args.requests

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    rgb = one_face_1024x768()
    processing = resize_rgb(rgb, 720, 960)
    bgr = np.ascontiguousarray(processing[:, :, ::-1])

    # 1. TensorFlow's background pass (the same random weights as the synthetic model's background).
    tf_bg = TFGenerator(build_generator_pb(BG_SEED))
    reference = median_ms(lambda: tf_bg(bgr), n)
    tf_bg.close()

    # 2. Our bare background pass and the pipeline's stages, in the dtype the service picks.
    auto = choose_dtype("auto", torch.device("cpu"))
    settings = Settings(model_dir=tmp / "models", cache_dir=tmp / "cache", allow_download=False, device="cpu")
    engine = loaded_engine(settings)
    cartoonizer = engine.cartoonizer("anime")
    tensor = torch.from_numpy(bgr).permute(2, 0, 1)[None].contiguous()
    bare = median_ms(lambda: cartoonizer.style.bg(tensor), n)
    options = Options(input_size=(768, 1024), min_face_size=settings.min_face_size)
    cartoonizer.run(processing, options)
    runs = [cartoonizer.run(processing, options) for _ in range(n)]
    stages = {s: statistics.median(r.timings_ms[s] for r in runs) for s in runs[0].timings_ms}
    result = runs[-1].image
    engine.close()
    png: dict[int, dict[str, Any]] = {}
    sizes: dict[str, int] = {}
    for level in range(MIN_PNG_COMPRESSION, MAX_PNG_COMPRESSION + 1):

        def ours(level: int = level) -> None:
            sizes["ours"] = len(encode(result, "png", png_compression=level))

        def pillows(level: int = level) -> None:
            out = io.BytesIO()
            Image.fromarray(result).save(out, "PNG", compress_level=level)
            sizes["pillow"] = len(out.getvalue())

        repeat = max(3, n // 3)
        png[level] = {"ms": median_ms(ours, repeat), "kib": sizes["ours"] / 1024,
                      "pillow_ms": median_ms(pillows, repeat), "pillow_kib": sizes["pillow"] / 1024,
                      "written_as": PNG_WRITES[level]}  # fmt: skip

    # 3–4. Through HTTP with the default settings.
    env = service_env(tmp / "models", tmp)
    server = LiveService(env, tmp / "server.log").start()
    url = server.url
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            latencies, timings, outside, untimed = [], [], [], []
            for i, body in enumerate(distinct_jpegs(rgb, n + 1)):
                start = time.perf_counter()
                r = client.post("/cartoonize", files={"image": ("me.jpg", body, "image/jpeg")})
                r.raise_for_status()
                elapsed = (time.perf_counter() - start) * 1000
                if r.headers.get("x-cache") != "miss":
                    raise SystemExit(f"request {i} was not a result-cache miss: {r.headers.get('x-cache')}")
                if i:  # the first is a warm-up
                    stage_ms = server_timing(r.headers["server-timing"])
                    latencies.append(elapsed)
                    timings.append(stage_ms)
                    outside.append(elapsed - sum(stage_ms[s] for s in GENERATOR_STAGES))
                    untimed.append(elapsed - sum(stage_ms.values()))
            sequential = statistics.median(latencies)
            served = {k: statistics.median(t[k] for t in timings) for k in timings[0]}
            served["untimed (HTTP, route)"] = statistics.median(untimed)
            outside_ms = statistics.median(outside)

        bodies = distinct_jpegs(rgb, 4 * max(2, n // 2) + n + 1)[n + 1 :]
        concurrent = concurrent_photos_per_s(url, bodies, 4)
    finally:
        server.stop()

    env_info = dict(python=platform.python_version(), torch=torch.__version__,
                    threads=torch.get_num_threads(), dtype=auto.name, dtype_reason=auto.reason,
                    requests=n)  # fmt: skip
    print(f"# request benchmark  {json.dumps(env_info)}")
    print(f"{'what':58} {'ms':>8} {'vs TF bg':>9}")
    rows = [
        ("TensorFlow background pass, 720×960 (the reference)", reference),
        (f"our bare background pass, 720×960, {auto.name}", bare),
        ("pipeline background stage, same photo", stages["background"]),
        ("pipeline detect stage", stages["detect"]),
        ("one request through HTTP, 1024×768 JPEG → PNG (median)", sequential),
    ]
    for label, ms in rows:
        print(f"{label:58} {ms:8.1f} {ms / reference:8.2f}x")
    print(f"background stage / bare pass: {stages['background'] / bare:.2f}x (target ≤ 1.10x)")
    print(f"detect: {stages['detect']:.1f} ms (target ≤ 25 ms)")
    print(f"request / TF reference: {sequential / reference:.2f}x (target ≤ 0.50x)")
    print(f"concurrency 4: {concurrent:.2f} photos/s ({concurrent * sequential / 1000:.2f}x one at a time)")
    print("server timing (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in served.items()))
    print(f"outside the generator passes: {outside_ms:.1f} ms (median; target ≤ 65 ms)")
    print("PNG of the result, ours (libvips: zlib level, row filter) against Pillow's zlib level:")
    for k, v in png.items():
        zlib_level, row_filter = v["written_as"]
        print(
            f"  level {k}: {v['ms']:6.0f} ms {v['kib']:5.0f} KiB (zlib {zlib_level}, {row_filter:5})"
            f"   Pillow {v['pillow_ms']:6.0f} ms {v['pillow_kib']:5.0f} KiB"
        )
    report = dict(environment=env_info, reference_ms=reference, bare_ms=bare, stages_ms=stages,
                  request_ms=sequential, latencies_ms=latencies, server_timing_ms=served,
                  outside_generators_ms=outside_ms,
                  concurrency4_photos_per_s=concurrent, png=png)  # fmt: skip
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
