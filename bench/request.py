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
choice), ours (:mod:`serving.encoding`: stripes on the server's default PNG threads, or libvips) beside
Pillow's at the same zlib level; and the
pieces of the request outside the generator passes that issue 20 part 6 changed, timed the previous
way and the current way side by side in this process, calls alternating (:func:`pieces`): the
upload decoded and brought to the processing size (Pillow's box filter then, OpenCV's area filter
now), the result brought to the output size (Pillow's bilinear then, OpenCV's now), and the
paste-back's sampling grid (``affine_grid`` over the whole crop's footprint then; the same values,
computed point by point over the mask's footprint only, now), and the model's output rounded to
uint8 RGB (torch's passes then, OpenCV's two now). Prints a table, writes JSON.
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
import torch.nn.functional as F
from PIL import Image

from bench.report import write_report
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import TFGenerator, build_generator_pb, write_fast_model_dir
from devkit.serve import LiveService, server_timing, service_env
from inference import align
from inference.geometry import resize_rgb, to_rgb_array
from inference.pipeline import Cartoonizer, Options, _rgb_hwc_uint8, _rgb_hwc_uint8_host, mask_support
from service.factory import loaded_engine
from service.settings import Settings
from serving.encoding import (
    MAX_PNG_COMPRESSION,
    MIN_PNG_COMPRESSION,
    PNG_WRITES,
    default_png_threads,
    encode,
    png_writer,
    write_png,
)
from serving.images import DEFAULT_MAX_PIXELS, decode

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


def paired_ms(before: Any, now: Any, n: int) -> tuple[float, float]:
    """Medians of ``n`` calls of each, alternating (a shared machine's load falls on both alike)."""
    before(), now()
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(n):
        for fn, out in ((before, times[0]), (now, times[1])):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return statistics.median(times[0]), statistics.median(times[1])


def pieces(
    rgb: np.ndarray, processing: np.ndarray, cartoon: np.ndarray, cartoonizer: Cartoonizer, n: int
) -> dict[str, Any]:
    """The changed pieces of a request outside the generator passes, the previous way and now, on
    the bench's photo (``processing``: at the processing size; ``cartoon``: its result there): decode
    to the processing size, the result to the output size, the paste-back's sampling grid for its
    face and the cartoon rounded to uint8 (module docstring)."""
    data = distinct_jpegs(rgb, 1)[0]
    (h, w), (oh, ow) = cartoon.shape[:2], rgb.shape[:2]

    def decoded() -> np.ndarray:
        return to_rgb_array(decode(data, max_pixels=DEFAULT_MAX_PIXELS, needed=(2 * h, 2 * w)).pixels)

    out: dict[str, Any] = {}
    out["decode to the processing size"] = paired_ms(
        lambda: np.array(Image.fromarray(decoded()).resize((w, h), Image.Resampling.BOX)),
        lambda: np.ascontiguousarray(resize_rgb(decoded(), h, w)),
        n,
    )
    out["result to the output size"] = paired_ms(
        lambda: np.array(Image.fromarray(cartoon).resize((ow, oh), Image.Resampling.BILINEAR)),
        lambda: np.ascontiguousarray(resize_rgb(cartoon, oh, ow)),
        n,
    )
    face = cartoonizer.detector.detect(torch.from_numpy(processing).permute(2, 0, 1))[0]
    _, inverse = align.crop_matrices(face.landmarks)
    to_crop = align.invert_affine(inverse[None])[0]
    whole = align.footprint_box(inverse, (h, w))
    masked = align.footprint_box(inverse, (h, w), mask_support(cartoonizer.style.mask))

    offset = np.array([[1.0, 0.0, whole.left], [0.0, 1.0, whole.top]])
    theta = align._theta(
        align._compose(to_crop, offset)[None],
        (whole.height, whole.width),
        (align.CROP_SIZE, align.CROP_SIZE),
        torch.device("cpu"),
    )
    rows = slice(masked.top - whole.top, masked.bottom - whole.top)
    cols = slice(masked.left - whole.left, masked.right - whole.left)
    out["paste-back grid of the face"] = paired_ms(
        lambda: F.affine_grid(theta, [1, 4, whole.height, whole.width], align_corners=False),
        lambda: align._affine_grid(theta, (whole.height, whole.width), rows, cols),
        n,
    )
    out["paste-back pixels"] = (whole.height * whole.width, masked.height * masked.width)
    # The model's output (float32 BGR, channels last, as the background pass leaves it) to uint8 RGB.
    # Both rounds start from a fresh copy (the stage rounds the model's output in place).
    bgr = torch.from_numpy(np.ascontiguousarray(cartoon[:, :, ::-1]).astype(np.float32)).permute(2, 0, 1)
    scratch = bgr.clone()
    out["the cartoon to uint8 (strength)"] = paired_ms(
        lambda: _rgb_hwc_uint8(scratch.copy_(bgr).round_().clamp_(0, 255)),
        lambda: _rgb_hwc_uint8_host(scratch.copy_(bgr)),
        n,
    )
    return out


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

    # 2. Our bare background pass and the pipeline's stages, in the dtype the service picks (auto
    # may pick int8 for the style, as the server below does: it shares the cache, so the int8 graphs
    # and their measured deviation are made once).
    settings = Settings(model_dir=tmp / "models", cache_dir=tmp / "cache", allow_download=False, device="cpu")
    engine = loaded_engine(settings)
    auto = engine.store.precision_of("anime")
    cartoonizer = engine.cartoonizer("anime")
    tensor = torch.from_numpy(bgr).permute(2, 0, 1)[None].contiguous()
    bare = median_ms(lambda: cartoonizer.style.bg(tensor), n)
    options = Options(input_size=(768, 1024), min_face_size=settings.min_face_size)
    cartoonizer.run(processing, options)
    runs = [cartoonizer.run(processing, options) for _ in range(n)]
    stages = {s: statistics.median(r.timings_ms[s] for r in runs) for s in runs[0].timings_ms}
    result = runs[-1].image
    later = cartoonizer.run(processing, Options(input_size=(768, 1024), min_face_size=settings.min_face_size,
                                                resize_later=True))  # fmt: skip
    before_now = pieces(rgb, processing, later.image, cartoonizer, 3 * n)
    engine.close()
    png: dict[int, dict[str, Any]] = {}
    png_threads = default_png_threads()
    sizes: dict[str, int] = {}
    for level in range(MIN_PNG_COMPRESSION, MAX_PNG_COMPRESSION + 1):

        def ours(level: int = level) -> None:
            sizes["ours"] = len(encode(result, "png", png_compression=level, png_threads=png_threads))

        def libvips(level: int = level) -> None:
            sizes["libvips"] = len(write_png(result, level, writer="libvips"))

        def pillows(level: int = level) -> None:
            out = io.BytesIO()
            Image.fromarray(result).save(out, "PNG", compress_level=level)
            sizes["pillow"] = len(out.getvalue())

        repeat = max(3, n // 3)
        png[level] = {"ms": median_ms(ours, repeat), "kib": sizes["ours"] / 1024,
                      "libvips_ms": median_ms(libvips, repeat), "libvips_kib": sizes["libvips"] / 1024,
                      "pillow_ms": median_ms(pillows, repeat), "pillow_kib": sizes["pillow"] / 1024,
                      "written_as": PNG_WRITES[level], "writer": png_writer(level)}  # fmt: skip

    # 3–4. Through HTTP with the default settings.
    env = service_env(tmp / "models", tmp)
    server = LiveService(env, tmp / "server.log").start()
    url = server.url
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            served_dtype = client.get("/readyz").json()["styles"]["anime"]["dtype"]
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
                    served_dtype=served_dtype, requests=n)  # fmt: skip
    print(f"# request benchmark  {json.dumps(env_info)}")
    print(f"{'what':58} {'ms':>8} {'vs TF bg':>9}")
    rows = [
        ("TensorFlow background pass, 720×960 (the reference)", reference),
        (f"our bare background pass, 720×960, {auto.name}", bare),
        ("pipeline background stage, same photo", stages["background"]),
        ("pipeline detect stage", stages["detect"]),
        (f"one request through HTTP, 1024×768 JPEG → PNG, {served_dtype} (median)", sequential),
    ]
    for label, ms in rows:
        print(f"{label:58} {ms:8.1f} {ms / reference:8.2f}x")
    print(f"background stage / bare pass: {stages['background'] / bare:.2f}x (target ≤ 1.10x)")
    print(f"detect: {stages['detect']:.1f} ms (target ≤ 25 ms)")
    print(f"request / TF reference: {sequential / reference:.2f}x (target ≤ 0.60x, moonshot 0.50x)")
    print(f"concurrency 4: {concurrent:.2f} photos/s ({concurrent * sequential / 1000:.2f}x one at a time)")
    print("server timing (median ms): " + ", ".join(f"{k} {v:.1f}" for k, v in served.items()))
    print(f"outside the generator passes: {outside_ms:.1f} ms (median; target ≤ 65 ms)")
    print("changed pieces, the previous way → now (median ms, calls alternating in this process):")
    for label, (before, now) in before_now.items():
        unit = "px" if label.endswith("pixels") else "ms"
        print(f"  {label:40} {before:9.1f} → {now:9.1f} {unit}  ({now / before:.2f}x)")
    print(f"PNG of the result: ours (its writer; {png_threads} threads), libvips and Pillow at each level:")
    for k, v in png.items():
        zlib_level, row_filter = v["written_as"]
        print(
            f"  level {k} (zlib {zlib_level}, {row_filter:5}): ours {v['ms']:6.1f} ms {v['kib']:5.0f} KiB"
            f" ({v['writer']}, {v['ms'] / v['libvips_ms']:.2f}x libvips)"
            f"   libvips {v['libvips_ms']:6.1f} ms {v['libvips_kib']:5.0f} KiB"
            f"   Pillow {v['pillow_ms']:6.1f} ms {v['pillow_kib']:5.0f} KiB"
        )
    report = dict(environment=env_info, reference_ms=reference, bare_ms=bare, stages_ms=stages,
                  request_ms=sequential, latencies_ms=latencies, server_timing_ms=served,
                  server_timings_ms=timings,
                  outside_generators_ms=outside_ms,
                  concurrency4_photos_per_s=concurrent, png=png, changed_pieces=before_now)  # fmt: skip
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
