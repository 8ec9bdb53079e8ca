"""Jobs benchmark: a job's throughput against the pipeline's own, and interactive latency during a job.

    python -m bench.jobs [--photos 100] [--side 640] [--probes 12] [--json bench/results/jobs.json]

Starts ``toonserve serve`` on a free loopback port with the synthetic model (default settings
otherwise), then in one run:

1. the pipeline alone, in this process, on the same photos: images/s (the reference); and the same
   with each photo's decode and PNG encode (one after another): the work a job item does, without
   the job;
2. the same photos as ``--photos`` sequential ``POST /cartoonize`` calls: images/s;
3. the same photos as one job (``POST /jobs``, followed to its end): images/s from the 202 to the end;
4. ``/cartoonize`` latency of one photo, ``--probes`` sequential calls, with the service idle, and
   again while a second job of the same photos runs: p50/p99 side by side.

Talks to 127.0.0.1 only; bounded in photos and time.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.report import write_report
from devkit import photos
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from service.factory import loaded_engine
from service.settings import Settings
from serving.encoding import encode
from serving.images import decode


def photo_set(count: int, side: int) -> list[tuple[str, bytes]]:
    """``count`` JPEGs of about ``side`` px on the long side: the three sample photos, flipped and
    shifted so no two are the same."""
    sources = [photos.one_face_1024x768(), photos.grace_hopper(), photos.astronaut()]
    out = []
    for i in range(count):
        rgb = sources[i % 3]
        if (i // 3) % 2:
            rgb = rgb[:, ::-1]
        h, w = rgb.shape[:2]
        scale = side / max(h, w)
        size = (max(16, round(w * scale) - (i % 5) * 4), max(16, round(h * scale)))
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(rgb)).resize(size, Image.BILINEAR).save(buf, "JPEG", quality=90)
        out.append((f"photo-{i:03d}.jpg", buf.getvalue()))
    return out


def pipeline_rates(models: Path, cache: Path, files: list[tuple[str, bytes]]) -> tuple[float, float]:
    """Images/s in this process: the pipeline alone on decoded photos, and decode + pipeline + PNG."""
    engine = loaded_engine(Settings(model_dir=models, cache_dir=cache, allow_download=False, device="cpu"))
    c = engine.cartoonizer("anime")
    images = [decode(data, max_pixels=40_000_000).pixels for _, data in files]
    c.run(images[0])
    start = time.perf_counter()
    for rgb in images:
        c.run(rgb)
    alone = len(images) / (time.perf_counter() - start)
    start = time.perf_counter()
    for _, data in files:
        encode(c.run(decode(data, max_pixels=40_000_000).pixels).image, "png")
    with_codec = len(files) / (time.perf_counter() - start)
    engine.close()
    return alone, with_codec


def sequential_rate(client: httpx.Client, files: list[tuple[str, bytes]]) -> float:
    start = time.perf_counter()
    for name, data in files:
        client.post("/cartoonize", files={"image": (name, data)}).raise_for_status()
    return len(files) / (time.perf_counter() - start)


def submit(client: httpx.Client, files: list[tuple[str, bytes]]) -> str:
    r = client.post("/jobs", files=[("images", f) for f in files])
    r.raise_for_status()
    job_id: str = r.json()["id"]
    return job_id


def wait_job(client: httpx.Client, job_id: str) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.2)


def job_rate(client: httpx.Client, files: list[tuple[str, bytes]]) -> float:
    start = time.perf_counter()
    job = wait_job(client, submit(client, files))
    assert job["status"] == "succeeded" and job["failed"] == 0, job
    return len(files) / (time.perf_counter() - start)


def latencies(client: httpx.Client, photo: tuple[str, bytes], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        client.post("/cartoonize", files={"image": photo}).raise_for_status()
        out.append((time.perf_counter() - t) * 1000)
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=100)
    ap.add_argument("--side", type=int, default=640, help="long side of the photos")
    ap.add_argument("--probes", type=int, default=12, help="interactive requests, idle and during a job")
    ap.add_argument("--json", type=Path, default=Path("bench/results/jobs.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    files = photo_set(args.photos, args.side)
    reference, with_codec = pipeline_rates(tmp / "models", tmp / "cache", files)

    env = service_env(tmp / "models", tmp)
    with (
        LiveService(env, tmp / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        probe = files[0]
        latencies(client, probe, 2)  # warm-up
        sequential = sequential_rate(client, files)
        as_job = job_rate(client, files)
        idle = latencies(client, probe, args.probes)
        running = submit(client, files)
        time.sleep(1.0)  # the job's items are flowing
        during = latencies(client, probe, args.probes)
        still_running = client.get(f"/jobs/{running}").json()["status"] == "running"
        wait_job(client, running)

    rows = [
        ("pipeline alone, in process (reference)", reference),
        ("decode + pipeline + PNG encode, in process", with_codec),
        (f"{args.photos} sequential POST /cartoonize", sequential),
        (f"one job of {args.photos} photos", as_job),
    ]
    print(f"# jobs benchmark: {args.photos} photos, long side {args.side}, default settings, CPU")
    print(f"{'what':45} {'img/s':>7} {'vs reference':>13}")
    for label, rate in rows:
        print(f"{label:45} {rate:7.2f} {rate / reference:12.0%}")
    p50_idle, p50_during = pct(idle, 50), pct(during, 50)
    print(f"/cartoonize latency, {args.probes} sequential calls of one photo (ms):")
    print(f"  idle:           p50 {p50_idle:7.0f}  p99 {pct(idle, 99):7.0f}")
    print(f"  during a job:   p50 {p50_during:7.0f}  p99 {pct(during, 99):7.0f}   "
          f"p50 ratio {p50_during / p50_idle:.2f}x (the job was {'still' if still_running else 'no longer'} "
          "running at the end)")  # fmt: skip
    report = dict(photos=args.photos, side=args.side, reference_images_per_s=reference,
                  with_codec_images_per_s=with_codec,
                  sequential_images_per_s=sequential, job_images_per_s=as_job, idle_ms=idle,
                  during_job_ms=during, job_still_running=still_running)  # fmt: skip
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
