"""Soak: a bounded load at twice the measured capacity, mixed traffic and hostile requests, for minutes.

    python -m bench.soak [--minutes 10] [--factor 2] [--json bench/results/soak.json]
    python -m bench.soak --burst        # RSS before, at the peak of, and after a burst of hostile work
    python -m bench.soak --clients      # fair shares: one client floods, another sends photos one by one
    python -m bench.soak --bombs        # peak RSS under decompression bombs, and a photo behind them

Starts ``toonserve serve`` (default settings, synthetic model) on a free loopback port and:

1. measures its capacity: photos/s of a 640×480 one-face JPEG at concurrency 4, for ~20 s;
2. sends, for ``--minutes``, requests arriving at ``--factor`` × that rate (open loop: arrivals do not
   wait for answers, at most 64 in flight): 70 % single photos, 10 % batches of three, 10 % small jobs
   (two photos, their events followed to the end), 10 % hostile requests (below); ``/healthz`` is
   probed ten times a second on its own connection;
3. samples the server's RSS every 5 s and reports, per minute, its peak, median and floor (least);
   the growth after minute 1 of the median and of the floor (the last whole minute of load against
   minute 1: a trend, not a transient peak; the floor is what the process keeps with the least work
   in flight, which a leak raises and a large photo running does not); and the RSS before the load
   and 30 s after it.

Hostile requests, from the ways small uploads used to buy large work: a 40000×1000 PNG with
``processing_size=2048``; a tiny lossless WebP that decodes to 6300×6300; a 1×1 PNG with
``output_size=8192``; a batch of three 512×600 photos at ``output_size=8192``; a body over the upload
limit sent chunked. Each must be answered at once or within its deadline, with a 4xx or a 503.

Reports status counts and p50/p99 per route, ``/healthz`` p99, RSS per minute. Loopback only.

``--clients`` (two named API keys): the *polite* client sends ``--photos`` photos one at a time, first
alone (idle), then while the *flood* client keeps ``--streams`` batches of 16 photos in flight back to
back (a 429 waits its Retry-After, as a well-behaved client does); reports the polite client's p50
and p99 in both phases, their ratio, and the flood's statuses and photos/s.

``--bombs``: 16 lossless 6300×6300 WebPs of 1.6 KB each, sent as three concurrent batches by one
client, then by three clients, then as 8 concurrent single requests; for each, the server's peak RSS
and the latency of a photo another client sends right behind them.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from bench.report import write_report
from devkit.memory import resident_mib
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from serving.scheduler import DEFAULT_QUEUE_SIZE

MAX_IN_FLIGHT = 64


def encode(rgb: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, fmt, **kw)
    return buf.getvalue()


class Payloads:
    """The request bodies, built once."""

    def __init__(self) -> None:
        photo = np.asarray(Image.fromarray(one_face_1024x768()).resize((640, 480)))
        self.photo = encode(photo, "JPEG", quality=90)
        self.portrait = encode(np.asarray(Image.fromarray(photo).resize((512, 600))), "JPEG", quality=90)
        strip = np.asarray(Image.fromarray(photo).resize((40000, 1000), Image.NEAREST))
        self.strip_png = encode(strip, "PNG", compress_level=9)
        self.webp_bomb = encode(np.zeros((6300, 6300, 3), np.uint8), "WEBP", lossless=True, quality=100)
        self.dot = encode(np.zeros((1, 1, 3), np.uint8), "PNG")


class Soak:
    def __init__(self, url: str, payloads: Payloads) -> None:
        self.url = url
        self.p = payloads
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.dropped = 0

    def record(self, route: str, r: httpx.Response | None, ms: float) -> None:
        if r is None:
            key = "no answer"
        else:
            key = str(r.status_code)
            if r.status_code == 503 and "retry-after" not in r.headers:
                key += " without Retry-After"
        self.statuses[route][key] += 1
        self.latencies[route].append(ms)

    async def timed(self, route: str, call: Callable[[], Awaitable[httpx.Response]]) -> httpx.Response | None:
        start = time.perf_counter()
        try:
            r: httpx.Response | None = await call()
        except httpx.HTTPError:
            r = None
        self.record(route, r, (time.perf_counter() - start) * 1000)
        return r

    async def single(self, c: httpx.AsyncClient) -> None:
        await self.timed(
            "POST /cartoonize", lambda: c.post("/cartoonize", files={"image": ("a.jpg", self.p.photo)})
        )

    async def batch(self, c: httpx.AsyncClient) -> None:
        files = [("images", (f"{i}.jpg", self.p.photo)) for i in range(3)]
        await self.timed("POST /cartoonize/batch", lambda: c.post("/cartoonize/batch", files=files))

    async def job(self, c: httpx.AsyncClient) -> None:
        files = [("images", (f"{i}.jpg", self.p.photo)) for i in range(2)]
        r = await self.timed("POST /jobs", lambda: c.post("/jobs", files=files))
        if r is None or r.status_code != 202:
            return
        job_id = r.json()["id"]

        async def follow() -> httpx.Response:
            async with c.stream("GET", f"/jobs/{job_id}/events") as events:
                async for _ in events.aiter_lines():
                    pass
                return events

        await self.timed("GET /jobs/{id}/events (to the end)", follow)
        await self.timed("DELETE /jobs/{id}", lambda: c.delete(f"/jobs/{job_id}"))

    async def hostile(self, c: httpx.AsyncClient) -> None:
        p = self.p
        multipart = {"content-type": "multipart/form-data; boundary=x"}
        cases: list[tuple[str, Callable[[], Awaitable[httpx.Response]]]] = [
            ("hostile: 40000×1000 PNG at 2048", lambda: c.post(
                "/cartoonize", files={"image": ("s.png", p.strip_png)}, data={"processing_size": "2048"})),
            ("hostile: 6300² lossless WebP", lambda: c.post(
                "/cartoonize", files={"image": ("w.webp", p.webp_bomb)})),
            ("hostile: 1×1 PNG to 8192", lambda: c.post(
                "/cartoonize", files={"image": ("d.png", p.dot)}, data={"output_size": "8192"})),
            ("hostile: batch at 8192", lambda: c.post(
                "/cartoonize/batch", files=[("images", (f"{i}.jpg", p.portrait)) for i in range(3)],
                data={"output_size": "8192"})),
            ("hostile: chunked over the limit", lambda: c.post(
                "/cartoonize", content=_chunks(25), headers=multipart)),
        ]  # fmt: skip
        route, call = random.choice(cases)
        await self.timed(route, call)

    async def arrival(self, c: httpx.AsyncClient, kind: str) -> None:
        if self.slots.locked():
            self.dropped += 1  # the client side is saturated: count it, do not queue without bound
            return
        async with self.slots:
            await getattr(self, kind)(c)


async def _chunks(mib: int) -> AsyncIterator[bytes]:
    """A well-formed multipart body whose one file is ``mib`` MiB, sent chunked (no Content-Length)."""
    yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n\r\n'
    for _ in range(mib):
        yield b"\xff" * (1024 * 1024)
    yield b"\r\n--x--\r\n"


async def capacity(url: str, body: bytes, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            while time.monotonic() < stop:
                r = await c.post("/cartoonize", files={"image": ("a.jpg", body)})
                if r.status_code == 200:
                    done += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(4)))
    return done / (time.monotonic() - start)


async def probe_health(url: str, stop: asyncio.Event, out: list[float]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as c:
        while not stop.is_set():
            start = time.perf_counter()
            try:
                await c.get("/healthz")
                out.append((time.perf_counter() - start) * 1000)
            except httpx.HTTPError:
                out.append(float("inf"))
            await asyncio.sleep(0.1)


async def sample_rss(pid: int, stop: asyncio.Event, out: list[tuple[float, float]], every: float) -> None:
    start = time.monotonic()
    while not stop.is_set():
        out.append((time.monotonic() - start, resident_mib(pid)))
        await asyncio.sleep(every)
    out.append((time.monotonic() - start, resident_mib(pid)))


async def soak(url: str, pid: int, p: Payloads, minutes: float, factor: float) -> dict[str, Any]:
    rate = factor * await capacity(url, p.photo, 20.0)
    s = Soak(url, p)
    stop = asyncio.Event()
    health: list[float] = []
    rss: list[tuple[float, float]] = []
    rss_before = resident_mib(pid)
    background = [asyncio.create_task(probe_health(url, stop, health)),
                  asyncio.create_task(sample_rss(pid, stop, rss, 5.0))]  # fmt: skip
    kinds = ["single"] * 7 + ["batch", "job", "hostile"]
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT + 8)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
        end = time.monotonic() + minutes * 60
        while time.monotonic() < end:
            task = asyncio.create_task(s.arrival(c, random.choice(kinds)))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(random.expovariate(rate))
        await asyncio.gather(*tasks)
    stop.set()
    await asyncio.gather(*background)
    await asyncio.sleep(30)  # the load is over and drained: what the process keeps
    rss_after = resident_mib(pid)
    minutes_seen: dict[int, list[float]] = {}
    for t, mib in rss:
        minutes_seen.setdefault(int(t // 60), []).append(mib)
    peak = {m: max(v) for m, v in minutes_seen.items()}
    typical = {m: statistics.median(v) for m, v in minutes_seen.items()}
    # The least RSS of each minute: what the process keeps when the least work is in flight (a leak
    # raises it; large photos that happen to be running do not).
    floor = {m: min(v) for m, v in minutes_seen.items()}
    # Growth is a trend, not the largest photo in flight: the median RSS of the last whole minute of
    # load against that of minute 1 (peaks move with whatever hostile work happens to be running).
    # The minutes after the arrivals stop (the queue and the jobs draining) are not load.
    whole = [m for m in typical if 1 <= m < minutes and len(minutes_seen[m]) >= 6]

    def growth(per_minute: dict[int, float]) -> float:
        return (per_minute[whole[-1]] - per_minute[1]) / per_minute[1] if len(whole) >= 2 else float("nan")

    return dict(
        capacity_per_s=rate / factor, arrival_rate_per_s=rate, minutes=minutes,
        statuses={k: dict(v) for k, v in s.statuses.items()},
        p50_ms={k: statistics.median(v) for k, v in s.latencies.items()},
        p99_ms={k: float(np.percentile(v, 99)) for k, v in s.latencies.items()},
        healthz_p50_ms=statistics.median(health), healthz_p99_ms=float(np.percentile(health, 99)),
        rss_before_mib=rss_before, rss_peak_mib_per_minute=peak, rss_median_mib_per_minute=typical,
        rss_floor_mib_per_minute=floor, rss_growth_after_minute_1=growth(typical),
        rss_floor_growth_after_minute_1=growth(floor), rss_30s_after_mib=rss_after, client_dropped=s.dropped,
    )  # fmt: skip


async def burst(url: str, pid: int, p: Payloads) -> dict[str, Any]:
    """RSS before, at the peak of, and 30 s after a burst of the heaviest legitimate work."""
    idle = resident_mib(pid)
    peak = idle
    stop = asyncio.Event()
    samples: list[tuple[float, float]] = []
    sampler = asyncio.create_task(sample_rss(pid, stop, samples, 0.2))
    s = Soak(url, p)
    async with httpx.AsyncClient(base_url=url, timeout=120) as c:
        await asyncio.gather(*(s.hostile(c) for _ in range(12)), *(s.batch(c) for _ in range(6)),
                             *(s.single(c) for _ in range(12)))  # fmt: skip
    await asyncio.sleep(30)
    stop.set()
    await sampler
    peak = max(mib for _, mib in samples)
    return dict(rss_idle_mib=idle, rss_peak_mib=peak, rss_after_30s_mib=samples[-1][1],
                statuses={k: dict(v) for k, v in s.statuses.items()})  # fmt: skip


#: The API keys of the --clients and --bombs modes (name=key).
CLIENT_KEYS = "flood=flood-key,polite=polite-key,bomber1=b1,bomber2=b2,bomber3=b3"


def _key(name: str) -> dict[str, str]:
    return {"X-API-Key": dict(k.split("=") for k in CLIENT_KEYS.split(","))[name]}


def _percentiles(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": statistics.median(ms), "p99_ms": float(np.percentile(ms, 99)), "n": len(ms)}


async def _one_by_one(c: httpx.AsyncClient, body: bytes, count: int, statuses: Counter[str]) -> list[float]:
    """The polite client: ``count`` photos, each sent when the previous one is answered."""
    out = []
    for _ in range(count):
        start = time.perf_counter()
        r = await c.post("/cartoonize", files={"image": ("me.jpg", body)}, headers=_key("polite"))
        out.append((time.perf_counter() - start) * 1000)
        statuses[str(r.status_code)] += 1
        await asyncio.sleep(0.1)
    return out


async def clients(url: str, p: Payloads, photos: int, streams: int) -> dict[str, Any]:
    """Fair shares (module docstring, --clients)."""
    idle_statuses: Counter[str] = Counter()
    flood_statuses: Counter[str] = Counter()
    polite_statuses: Counter[str] = Counter()
    flooded = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as c:
        idle = await _one_by_one(c, p.photo, photos, idle_statuses)

        async def flood() -> None:
            nonlocal flooded
            files = [("images", (f"{i}.jpg", p.photo)) for i in range(16)]
            while not stop.is_set():
                r = await c.post("/cartoonize/batch", files=files, headers=_key("flood"))
                flood_statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    flooded += 16
                elif "retry-after" in r.headers:
                    await asyncio.sleep(float(r.headers["retry-after"]))

        flooders = [asyncio.create_task(flood()) for _ in range(streams)]
        await asyncio.sleep(3.0)  # the flood fills its share of the queue first
        start = time.monotonic()
        during = await _one_by_one(c, p.photo, photos, polite_statuses)
        elapsed = time.monotonic() - start
        stop.set()
        await asyncio.gather(*flooders)
    a, b = _percentiles(idle), _percentiles(during)
    return dict(
        polite_idle=a, polite_during_flood=b, p50_ratio=b["p50_ms"] / a["p50_ms"],
        p99_ratio=b["p99_ms"] / a["p99_ms"], target_p99_ms=max(4 * a["p50_ms"], 3000.0),
        polite_statuses=dict(polite_statuses), idle_statuses=dict(idle_statuses),
        flood_statuses=dict(flood_statuses), flood_photos_per_s=flooded / elapsed, flood_streams=streams,
    )  # fmt: skip


async def bombs(url: str, pid: int, p: Payloads) -> dict[str, Any]:
    """Decompression bombs (module docstring, --bombs)."""
    out: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=url, timeout=300) as c:
        idle = await _one_by_one(c, p.photo, 5, Counter())
        out["photo_idle_p50_ms"] = statistics.median(idle)
        batch = [("images", (f"{i}.webp", p.webp_bomb)) for i in range(16)]
        cases: dict[str, Callable[[], list[Awaitable[httpx.Response]]]] = {
            "3 batches of 16, one client": lambda: [
                c.post("/cartoonize/batch", files=batch, headers=_key("bomber1")) for _ in range(3)],
            "3 batches of 16, three clients": lambda: [
                c.post("/cartoonize/batch", files=batch, headers=_key(f"bomber{k}")) for k in (1, 2, 3)],
            "8 single requests": lambda: [
                c.post("/cartoonize", files={"image": ("b.webp", p.webp_bomb)}, headers=_key("bomber1"))
                for _ in range(8)],
        }  # fmt: skip
        for name, make in cases.items():
            await asyncio.sleep(5)  # what the previous case freed is given back (the trim)
            stop = asyncio.Event()
            samples: list[tuple[float, float]] = []
            sampler = asyncio.create_task(sample_rss(pid, stop, samples, 0.05))
            sent = [asyncio.ensure_future(call) for call in make()]
            await asyncio.sleep(0.3)
            behind = await _one_by_one(c, p.photo, 1, Counter())
            answers = await asyncio.gather(*sent)
            stop.set()
            await sampler
            out[name] = dict(
                rss_before_mib=samples[0][1], rss_peak_mib=max(m for _, m in samples),
                statuses=dict(Counter(str(r.status_code) for r in answers)), photo_behind_ms=behind[0],
            )  # fmt: skip
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--factor", type=float, default=2.0)
    ap.add_argument("--burst", action="store_true")
    ap.add_argument("--clients", action="store_true", help="two clients: one floods, one sends one by one")
    ap.add_argument("--bombs", action="store_true", help="peak RSS under decompression bombs")
    ap.add_argument("--photos", type=int, default=30, help="--clients: the polite client's photos per phase")
    ap.add_argument("--streams", type=int, default=3, help="--clients: the flood's batches in flight")
    ap.add_argument("--env", action="append", default=[], help="extra KEY=VALUE for the server")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    random.seed(1)
    tmp = Path(tempfile.mkdtemp(prefix="toonserve-soak-"))
    write_fast_model_dir(tmp / "models" / "anime")
    env = service_env(tmp / "models", tmp, TOONSERVE_LOG_LEVEL="error")
    if args.clients or args.bombs:
        env["TOONSERVE_API_KEYS"] = CLIENT_KEYS
    else:
        # The soak's and the burst's requests stand for many users (from one address): one client
        # may fill the whole queue, as before there were per-client shares.
        env["TOONSERVE_CLIENT_QUEUE_SIZE"] = str(DEFAULT_QUEUE_SIZE)
    env.update(item.split("=", 1) for item in args.env)
    server = LiveService(env, tmp / "server.log").start()
    url = server.url
    try:
        payloads = Payloads()
        if args.burst:
            report = asyncio.run(burst(url, server.pid, payloads))
        elif args.clients:
            report = asyncio.run(clients(url, payloads, args.photos, args.streams))
        elif args.bombs:
            report = asyncio.run(bombs(url, server.pid, payloads))
        else:
            report = asyncio.run(soak(url, server.pid, payloads, args.minutes, args.factor))
    finally:
        server.stop()
    report["server_env"] = args.env
    print(json.dumps(report, indent=2))
    mode = next((m for m in ("burst", "clients", "bombs") if getattr(args, m)), "soak")
    out = args.json or Path("bench/results") / f"{mode}.json"
    write_report(out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
