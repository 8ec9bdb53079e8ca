"""Events streams benchmark: what idle ``GET /jobs/{id}/events`` streams cost a running job.

    python -m bench.event_streams [--photos 24] [--listeners 1000] [--rounds 2]
                                  [--json bench/results/event_streams.json]

Starts ``toonserve serve`` on a free loopback port with the synthetic model, its stream caps raised
above ``--listeners``, then runs a job of ``--photos`` photos ``--rounds`` times each way, taking
turns (so a neighbour's load on the machine falls on both alike), after a warm-up run of the same
photos:

1. with no listener;
2. with ``--listeners`` events streams on that job, opened right after it is accepted by clients that
   never read (raw sockets: what an attacker holds open costs the bench nothing).

For each: the job's items/s, over the whole job (from the 202 to its end) and over the part after the
listeners were all connected (the service's own ``toonserve_job_event_streams`` says when), and the
latency of ``GET /jobs/{id}`` polled through the job, 10 calls a second (p50/p99); then the medians
of the rounds side by side. Each listener's answer is checked to be a 200. Since items/s moves with
whatever else the machine runs, the service process's CPU seconds per item are given too. Talks to
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import socket
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.jobs import pct, photo_set, submit
from bench.report import write_report
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env


@dataclass
class Run:
    """One job's figures."""

    listeners: int
    whole_rate: float = 0.0
    steady_rate: float = 0.0
    #: Seconds from the 202 until every listener was connected.
    connect_s: float = 0.0
    get_ms: list[float] = field(default_factory=list)
    accepted: int = 0
    #: The service process's CPU seconds per item (user + system, all its threads): unlike items/s,
    #: not moved by other work on the machine.
    cpu_per_item: float = 0.0
    #: CPU seconds the rest of the machine used meanwhile (neither the service nor this bench):
    #: a neighbour's load, which slows the job whatever the listeners.
    others_cpu_s: float = 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds every process of the machine has used so far (Linux ``/proc/stat``)."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def open_streams(url: str, job_id: str, count: int) -> list[socket.socket]:
    """``count`` connections that ask for the job's events and never read."""
    host, port = url.removeprefix("http://").split(":")
    request = f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n"
    out = []
    for _ in range(count):
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(request.encode())
        out.append(s)
    return out


def status_lines(streams: list[socket.socket]) -> dict[str, int]:
    """How many streams answered with each status line."""
    seen: dict[str, int] = {}
    for s in streams:
        try:
            line = s.recv(64).split(b"\r\n", 1)[0].decode(errors="replace")
        except OSError as exc:
            line = f"error: {exc}"
        seen[line] = seen.get(line, 0) + 1
    return seen


def open_now(client: httpx.Client) -> int | None:
    """Events streams the service holds open (None: a service that does not say)."""
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("toonserve_job_event_streams "):
            return int(float(line.split()[1]))
    return None


def wait_connected(client: httpx.Client, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        held = open_now(client)
        if held is None:  # an older service: give it a moment
            time.sleep(2.0)
            return
        if held >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"only {open_now(client)} of {count} streams connected")


def poll_job(client: httpx.Client, job_id: str, stop: threading.Event, into: list[float]) -> None:
    """``GET /jobs/{id}`` one call after another, its latency in ms, until ``stop``."""
    while not stop.is_set():
        t = time.perf_counter()
        client.get(f"/jobs/{job_id}").raise_for_status()
        into.append((time.perf_counter() - t) * 1000)
        time.sleep(0.1)


def run_job(client: httpx.Client, pid: int, files: list[tuple[str, bytes]], listeners: int) -> Run:
    run = Run(listeners)
    cpu0, machine0, own0 = cpu_s(pid), machine_busy_s(), own_cpu_s()
    start = time.perf_counter()
    job_id = submit(client, files)
    streams: list[socket.socket] = []
    stop = threading.Event()
    poller = threading.Thread(target=poll_job, args=(client, job_id, stop, run.get_ms), daemon=True)
    try:
        if listeners:
            streams = open_streams(str(client.base_url).rstrip("/"), job_id, listeners)
            wait_connected(client, listeners)
        run.connect_s = time.perf_counter() - start
        t0, done0 = time.perf_counter(), client.get(f"/jobs/{job_id}").json()["done"]
        poller.start()
        while True:
            job: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.1)
        end = time.perf_counter()
        assert job["status"] == "succeeded" and job["failed"] == 0, job
        run.whole_rate = len(files) / (end - start)
        run.steady_rate = (len(files) - done0) / (end - t0)
        service = cpu_s(pid) - cpu0
        run.cpu_per_item = service / len(files)
        run.others_cpu_s = machine_busy_s() - machine0 - service - (own_cpu_s() - own0)
        if streams:
            seen = status_lines(streams)
            run.accepted = seen.get("HTTP/1.1 200 OK", 0)
            assert run.accepted == listeners, seen
    finally:
        stop.set()
        if poller.is_alive():
            poller.join()
        for s in streams:
            with contextlib.suppress(OSError):
                s.close()
    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=24)
    ap.add_argument("--side", type=int, default=640, help="long side of the photos")
    ap.add_argument("--listeners", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="jobs each way, taking turns")
    ap.add_argument("--json", type=Path, default=Path("bench/results/event_streams.json"))
    args = ap.parse_args()

    # Each listener is a socket here and one in the service (which inherits this limit).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 2 * args.listeners + 512))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    files = photo_set(args.photos, args.side)
    caps = str(args.listeners + 100)
    env = service_env(
        tmp / "models",
        tmp,
        TOONSERVE_CLIENT_EVENT_STREAMS=caps,
        TOONSERVE_MAX_EVENT_STREAMS=caps,
        TOONSERVE_LOG_LEVEL="warning",
    )
    with (
        LiveService(env, tmp / "server.log") as server,
        httpx.Client(base_url=server.url, timeout=600) as client,
    ):
        # Warm-up: every photo once (the first run of each image size is slower: kernels are made
        # for it), so both kinds of run see a warm service.
        run_job(client, server.pid, files, 0)
        runs = [
            run_job(client, server.pid, files, n) for _ in range(args.rounds) for n in (0, args.listeners)
        ]

    print(f"# events streams benchmark: a job of {args.photos} photos (long side {args.side}), CPU, "
          f"{args.rounds} round(s) each way")  # fmt: skip
    header = f"{'listeners':>9} {'items/s whole':>14} {'items/s steady':>15} {'connect s':>10} "
    print(header + f"{'GET /jobs/{id} p50 ms':>22} {'p99 ms':>7} {'GETs':>5} {'CPU s/item':>11} "
          f"{'others CPU s':>13}")  # fmt: skip
    for r in runs:
        print(f"{r.listeners:9d} {r.whole_rate:14.2f} {r.steady_rate:15.2f} {r.connect_s:10.1f} "
              f"{pct(r.get_ms, 50):22.1f} {pct(r.get_ms, 99):7.1f} {len(r.get_ms):5d} "
              f"{r.cpu_per_item:11.3f} {r.others_cpu_s:13.1f}")  # fmt: skip
    medians = {}
    for n in (0, args.listeners):
        mine = [r for r in runs if r.listeners == n]
        medians[n] = (
            statistics.median(r.whole_rate for r in mine),
            statistics.median(r.steady_rate for r in mine),
            pct([ms for r in mine for ms in r.get_ms], 50),
            statistics.median(r.cpu_per_item for r in mine),
        )
    (q_whole, q_steady, q_p50, q_cpu), (l_whole, l_steady, l_p50, l_cpu) = (
        medians[0],
        medians[args.listeners],
    )
    print(f"median of the rounds: items/s {q_steady:.2f} -> {l_steady:.2f} steady "
          f"({(l_steady - q_steady) / q_steady:+.1%}), {q_whole:.2f} -> {l_whole:.2f} whole job "
          f"({(l_whole - q_whole) / q_whole:+.1%}); GET /jobs/{{id}} p50 {q_p50:.1f} -> {l_p50:.1f} ms "
          f"with {args.listeners} listeners; service CPU per item {q_cpu:.3f} -> {l_cpu:.3f} s "
          f"({(l_cpu - q_cpu) / q_cpu:+.1%})")  # fmt: skip
    report = {
        "photos": args.photos,
        "side": args.side,
        "rounds": args.rounds,
        "runs": [
            {
                "listeners": r.listeners,
                "items_per_s_whole": r.whole_rate,
                "items_per_s_steady": r.steady_rate,
                "connect_s": r.connect_s,
                "get_job_ms": r.get_ms,
                "get_job_p50_ms": pct(r.get_ms, 50),
                "listeners_accepted": r.accepted,
                "service_cpu_s_per_item": r.cpu_per_item,
                "others_cpu_s": r.others_cpu_s,
            }
            for r in runs
        ],
    }
    write_report(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
