"""Jobs on several replicas: throughput with one and two replicas, the Redis store's overhead against the
embedded SQLite one, and how long a dead replica's item waits for another.

    python -m bench.replicas [--photos 24] [--lease 60] [--takeovers 2] [--json bench/results/replicas.json]

Starts ``redis-server`` on a free loopback port (Debian's; ``make test`` installs it) and
``toonserve serve`` replicas with the synthetic model (the real weights cannot be downloaded here),
all on one data directory, then in one run:

1. **throughput**: one job of ``--photos`` different portraits (about 400–560 px, processed at the
   default 720 px short side) posted to the first replica; photos/s from the 202 to the job's end,
   for SQLite with one replica, Redis with one, Redis with two (each with the default torch threads,
   so they share the cores), and Redis with one and two replicas given half of the cores each
   (``OMP_NUM_THREADS``, as pods of half the size would be). Every run checks nothing is lost:
   every item ``ok``, one result per photo in the ZIP;
2. **store overhead**, in this process, no model: create a one-photo job, claim, renew, finish; the
   median milliseconds of each call for each store (the two alternate, so both see the same load);
3. **takeover**: two replicas, a job running on both; the first is killed (``kill -9``) while it
   holds an item; the time until the other replica holds that item (polled in Redis every 10 ms),
   with the lease ``--lease``. Expected: the lease less the time since the item's last renewal (up
   to 1 s), plus up to 1 s until the survivor next asks for work, plus until it has a free slot.

Talks to 127.0.0.1 only; bounded in photos and time.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.report import write_report
from devkit import photos
from devkit.redis_server import RedisServer
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from jobs.redis import RedisJobStore
from jobs.sqlite import SQLiteJobStore
from jobs.store import Upload
from serving.options import ResolvedOptions

QUEUE = "{toonserve}:queue:anime:anonymous"  # the stream of the anime jobs of clients without keys


def photo_set(count: int) -> list[tuple[str, bytes]]:
    """``count`` different JPEG portraits (two faces, one no-face photo, several sizes and crops)."""
    sources = [photos.astronaut(), photos.grace_hopper(), photos.coffee()]
    out = []
    for i in range(count):
        side = 400 + 8 * (i % 21)
        buf = io.BytesIO()
        Image.fromarray(sources[i % 3]).resize((side, side + 16 * (i % 3))).save(buf, "JPEG", quality=90)
        out.append((f"photo-{i:03d}.jpg", buf.getvalue()))
    return out


def replica_env(
    models: Path, cache: Path, data: Path, backend: str, redis_url: str, lease: float, threads: int | None
) -> dict[str, str]:
    env = service_env(models, data.parent, TOONSERVE_CACHE_DIR=str(cache), TOONSERVE_DATA_DIR=str(data),
                      TOONSERVE_JOBS_BACKEND=backend, TOONSERVE_REDIS_URL=redis_url,
                      TOONSERVE_JOB_LEASE_S=str(lease))  # fmt: skip
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def submit(url: str, files: list[tuple[str, bytes]]) -> str:
    r = httpx.post(url + "/jobs", files=[("images", f) for f in files], timeout=300)
    r.raise_for_status()
    return str(r.json()["id"])


def wait_job(url: str, job_id: str, timeout: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} did not end in {timeout} s")


def check_nothing_lost(url: str, job: dict[str, Any], count: int) -> None:
    assert job["status"] == "succeeded" and job["done"] == count and job["failed"] == 0, job
    r = httpx.get(f"{url}/jobs/{job['id']}/result", timeout=300)
    with zipfile.ZipFile(io.BytesIO(r.content)) as zf:
        names = [n for n in zf.namelist() if n != "results.json"]
    assert len(names) == len(set(names)) == count, names


def throughput(
    tmp: Path, label: str, backend: str, replicas: int, threads: int | None, files: list[tuple[str, bytes]]
) -> dict[str, Any]:
    run = tmp / f"run-{label}"
    server = RedisServer(run / "redis").start() if backend == "redis" else None
    url = server.url if server else "redis://127.0.0.1:1/0"
    nodes = []
    for i in range(replicas):
        env = replica_env(tmp / "models", run / f"cache-{i}", run / "data", backend, url, 60, threads)
        nodes.append(LiveService(env, run / f"r{i}.log"))
    try:
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_ready()
        # A short job first, so every replica has run the model once (first-call costs aside).
        wait_job(nodes[0].url, submit(nodes[0].url, files[: replicas * 2]))
        start = time.perf_counter()
        job_id = submit(nodes[0].url, files)
        accepted = time.perf_counter()
        job = wait_job(nodes[-1].url, job_id)
        elapsed = time.perf_counter() - accepted
        check_nothing_lost(nodes[-1].url, job, len(files))
    finally:
        for node in nodes:
            node.stop()
        if server:
            server.stop()
    return dict(label=label, backend=backend, replicas=replicas, torch_threads=threads or "default",
                photos=len(files), upload_s=accepted - start, seconds=elapsed,
                photos_per_s=len(files) / elapsed)  # fmt: skip


def store_overhead(tmp: Path, cycles: int) -> dict[str, dict[str, float]]:
    """Median ms of each store call for one item (create with one photo, claim, renew, finish), per
    store; the two stores alternate cycle by cycle, so both see the same disk and load."""
    options = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)
    photo = b"x" * 50_000
    result = b"y" * 200_000
    server = RedisServer(tmp / "overhead-redis").start()
    stores = {
        "sqlite": SQLiteJobStore(tmp / "overhead-sqlite"),
        "redis": RedisJobStore(tmp / "overhead-data", server.url, lease_s=60),
    }
    times: dict[str, dict[str, list[float]]] = {
        name: {op: [] for op in ("create", "claim", "renew", "finish", "item")} for name in stores
    }
    try:
        for n in range(cycles):
            for name, store in stores.items():
                t = times[name]
                t0 = time.perf_counter()
                upload = Upload("a.jpg", io.BytesIO(photo), len(photo), None, 10**6)
                store.create(f"{n:032x}", options, [upload], webhook=None, idempotency_key=f"k{n}",
                             ttl_s=3600, quota_bytes=10**12)  # fmt: skip
                t1 = time.perf_counter()
                claim = store.claim({"anime"}, "bench")
                assert claim is not None
                t2 = time.perf_counter()
                store.renew(claim)
                t3 = time.perf_counter()
                store.finish(claim, "ok", result=result, ttl_s=3600)
                t4 = time.perf_counter()
                for op, dt in (("create", t1 - t0), ("claim", t2 - t1), ("renew", t3 - t2),
                               ("finish", t4 - t3), ("item", t4 - t0)):  # fmt: skip
                    t[op].append(dt * 1000)
    finally:
        for store in stores.values():
            store.close()
        server.stop()
    return {name: {op: statistics.median(v) for op, v in t.items()} for name, t in times.items()}


def takeovers(tmp: Path, lease: float, samples: int, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
    run = tmp / "takeover"
    server = RedisServer(run / "redis").start()
    redis = server.client()
    a, b = (
        LiveService(replica_env(tmp / "models", run / f"cache-{n}", run / "data", "redis", url, lease, None),
                run / f"{n}.log")
        for n, url in (("a", server.url), ("b", server.url))
    )  # fmt: skip
    out = []
    try:
        b.launch()
        for sample in range(samples):
            a.log.unlink(missing_ok=True)
            a.launch()
            a.wait_ready()
            b.wait_ready()
            runner_a = a.runner_id()
            job_id = submit(a.url, files)
            deadline = time.monotonic() + 300
            while not (held := redis.xpending_range(QUEUE, "runners", "-", "+", 10, consumername=runner_a)):
                assert time.monotonic() < deadline, "replica a never held an item"
                time.sleep(0.01)
            entry = held[0]["message_id"]
            a.kill()
            killed = time.perf_counter()
            while True:
                now = redis.xpending_range(QUEUE, "runners", entry, entry, 1)
                if now and now[0]["consumer"] != runner_a:
                    taken = time.perf_counter() - killed
                    break
                if not now:  # only its holder acks it, and a is dead
                    raise SystemExit(f"entry {entry} left the pending list without a takeover")
                assert time.perf_counter() - killed < lease + 120, "no takeover"
                time.sleep(0.01)
            job = wait_job(b.url, job_id)
            check_nothing_lost(b.url, job, len(files))
            out.append(dict(sample=sample + 1, lease_s=lease, takeover_s=taken,
                            idle_at_kill_ms=held[0]["time_since_delivered"]))  # fmt: skip
    finally:
        a.stop()
        b.stop()
        server.stop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--lease", type=float, default=60.0)
    ap.add_argument("--takeovers", type=int, default=2)
    ap.add_argument("--overhead-cycles", type=int, default=200)
    ap.add_argument("--json", type=Path, default=Path("bench/results/replicas.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-replicas-"))
    write_fast_model_dir(tmp / "models" / "anime")
    files = photo_set(args.photos)
    cores = os.cpu_count() or 1
    half = max(1, cores // 2)

    rows = [
        throughput(tmp, "sqlite-1", "sqlite", 1, None, files),
        throughput(tmp, "redis-1", "redis", 1, None, files),
        throughput(tmp, "redis-2", "redis", 2, None, files),
        throughput(tmp, f"redis-1x{half}t", "redis", 1, half, files),
        throughput(tmp, f"redis-2x{half}t", "redis", 2, half, files),
    ]
    overhead = store_overhead(tmp, args.overhead_cycles)
    taken = takeovers(tmp, args.lease, args.takeovers, photo_set(max(args.photos, 30)))

    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    print(f"# replicas benchmark: {cores} cores, {args.photos} photos per job (400-560 px, processed at "
          f"720), synthetic model, redis-server {version}")  # fmt: skip
    base = rows[0]["photos_per_s"]
    print(f"{'run':<14} {'backend':<7} {'replicas':>8} {'torch thr':>9} {'photos/s':>9} {'vs sqlite-1':>11} "
          f"{'job s':>7} {'upload s':>8}  lost")  # fmt: skip
    for r in rows:
        print(f"{r['label']:<14} {r['backend']:<7} {r['replicas']:>8} {r['torch_threads']!s:>9} "
              f"{r['photos_per_s']:9.2f} {r['photos_per_s'] / base:10.0%} {r['seconds']:7.1f} "
              f"{r['upload_s']:8.2f}  0")  # fmt: skip
    print(f"store calls per item, median ms of {args.overhead_cycles} (create and finish include the "
          "fsynced photo and result files):")  # fmt: skip
    print(f"{'store':<7} " + " ".join(f"{op:>7}" for op in overhead["sqlite"]))
    for name, ops in overhead.items():
        print(f"{name:<7} " + " ".join(f"{ms:7.2f}" for ms in ops.values()))
    samples = [f"{t['takeover_s']:.1f} s (idle {t['idle_at_kill_ms'] / 1000:.1f} s at the kill)"
               for t in taken]  # fmt: skip
    print(f"takeover after kill -9 (lease {args.lease:g} s): " + ", ".join(samples))
    write_report(args.json, dict(cores=cores, throughput=rows, store_overhead_ms=overhead, takeovers=taken))
    return 0


if __name__ == "__main__":
    sys.exit(main())
