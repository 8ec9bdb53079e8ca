"""Job uploads under attack: the memory they cost and the storage tiny large photos can take.

    python -m bench.job_uploads [--compare DIR] [--json bench/results/job_uploads.json]

Starts ``toonserve serve`` (synthetic model, named clients alice and bob, 10 GiB of job storage, one
job item at a time) from this checkout and, with ``--compare DIR``, the same from another checkout
(e.g. a ``git worktree`` of an older commit), and on each:

1. **big photos**: three concurrent ``POST /jobs``, each one 300 MB photo (a small JPEG followed by
   300 MB that are not pixels) and one small photo: the rise of the server's RSS over where it was,
   sampled every 10 ms while they run, and what became of the big photo;
2. **many photos**: three concurrent jobs of 15 photos of 19 MB (285 MB each): the same;
3. **tiny large photos**: alice sends jobs of 8 lossless WebPs of a 6324² solid colour (1.6 KB each,
   40 MP) until one is refused, then of one until one is refused (at most 16 jobs of each): how many
   were accepted; then bob sends four 12 MP photos: 202, or 507 when alice filled the storage.

Each case runs on a fresh service.

Prints the figures side by side. Talks to 127.0.0.1 only; needs about 2 GB free under the temporary
directory. Targets: 1 and 2 rise under 200 MB; in 3 bob's job is accepted.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from bench.report import write_report
from devkit import photos
from devkit.memory import RssRise
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env

MB = 1024 * 1024
ALICE = {"X-API-Key": "alice-key"}
BOB = {"X-API-Key": "bob-key"}


def _small_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (180, 120, 90)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _concurrent_rise(
    server: LiveService, bodies: list[list[tuple[str, tuple[str, bytes]]]]
) -> dict[str, Any]:
    """Sends the jobs at once; the server's RSS rise (MB) while they run, and their answers."""
    answers: list[httpx.Response] = []

    def send(files: list[tuple[str, tuple[str, bytes]]]) -> None:
        answers.append(httpx.post(f"{server.url}/jobs", files=files, headers=ALICE, timeout=600))

    senders = [threading.Thread(target=send, args=(files,)) for files in bodies]
    start = time.perf_counter()
    with RssRise(server.pid) as memory:
        for t in senders:
            t.start()
        for t in senders:
            t.join()
    seconds = time.perf_counter() - start
    first_items = []
    for r in answers:
        if r.status_code in (200, 202):
            item = r.json()["items"][0]
            first_items.append(item["status"] if item["error"] is None else item["error"]["code"])
            httpx.delete(f"{server.url}/jobs/{r.json()['id']}", headers=ALICE)
    return {
        "statuses": sorted(r.status_code for r in answers),
        "first_item": first_items,
        "rss_before_mb": round(memory.before, 1),
        "rise_mb": round(memory.rise, 1),
        "seconds": round(seconds, 1),
    }


def _tiny_large(server: LiveService) -> dict[str, Any]:
    flat = io.BytesIO()
    Image.new("RGB", (6324, 6324), (90, 140, 200)).save(flat, "WEBP", lossless=True)
    files = [("images", (f"{i}.webp", flat.getvalue())) for i in range(8)]
    accepted, refusal = 0, ""
    # Jobs of 8 until one is refused, then of 1 until one is refused: the room left is then less than
    # one photo's reservation.
    for batch in (files, files[:1]):
        for _ in range(16):
            r = httpx.post(f"{server.url}/jobs", files=batch, headers=ALICE, timeout=600)
            if r.status_code != 202:
                refusal = f"{r.status_code} {r.json()['error']['code']}"
                break
            accepted += len(batch)
    # Bob's four 12 MP photos.
    photo = io.BytesIO()
    Image.fromarray(photos.astronaut()).resize((4000, 3000)).save(photo, "JPEG", quality=90)
    mine = [("images", (f"me-{i}.jpg", photo.getvalue())) for i in range(4)]
    bob = httpx.post(f"{server.url}/jobs", files=mine, headers=BOB, timeout=600)
    return {
        "file_bytes": len(flat.getvalue()),
        "accepted_photos": accepted,
        "alice_refused_with": refusal or "-",
        "bob": bob.status_code,
    }


def run(source: Path, tmp: Path) -> dict[str, Any]:
    write_fast_model_dir(tmp / "models" / "anime")
    env = service_env(
        tmp / "models",
        tmp,
        TOONSERVE_API_KEYS="alice=alice-key,bob=bob-key",
        TOONSERVE_JOB_CONCURRENCY="1",
        TOONSERVE_MAX_JOB_STORAGE_BYTES=str(10 * 1024**3),
        PYTHONPATH=str(source),
    )
    small = _small_jpeg()
    here = Path.cwd()
    os.chdir(source)  # `python -m service.cli` imports the checkout it is started in
    results: dict[str, Any] = {}
    try:
        # A fresh service for each case: what one case leaves allocated does not hide the next's rise.
        with LiveService(env, tmp / "server.log") as server:
            big = small + b"\0" * (300 * MB)
            pair = [("images", ("big.jpg", big)), ("images", ("small.jpg", small))]
            results["big photos"] = _concurrent_rise(server, [pair] * 3)
            del big, pair
        with LiveService(env, tmp / "server.log") as server:
            photo = small + b"\0" * (19 * MB)
            many = [("images", (f"{i}.jpg", photo)) for i in range(15)]
            results["many photos"] = _concurrent_rise(server, [many] * 3)
            del photo, many
        with LiveService(env, tmp / "server.log") as server:
            results["tiny large photos"] = _tiny_large(server)
        return results
    finally:
        os.chdir(here)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--compare", type=Path, help="another checkout to measure the same way")
    parser.add_argument("--json", type=Path, default=Path("bench/results/job_uploads.json"))
    args = parser.parse_args()
    sources = {"this checkout": Path.cwd()}
    if args.compare is not None:
        sources[f"compare ({args.compare})"] = args.compare.resolve()
    report = {}
    for name, source in sources.items():
        with tempfile.TemporaryDirectory() as tmp:
            report[name] = run(source, Path(tmp))
    names = list(report)
    print(f"{'':28}" + "".join(f"{n[:34]:>36}" for n in names))
    for case in ("big photos", "many photos"):
        for key in ("statuses", "first_item", "rise_mb", "seconds"):
            cells = "".join(f"{str(report[n][case][key])[:34]:>36}" for n in names)
            print(f"{case + ': ' + key:28}{cells}")
    for key in ("file_bytes", "accepted_photos", "alice_refused_with", "bob"):
        cells = "".join(f"{str(report[n]['tiny large photos'][key])[:34]:>36}" for n in names)
        print(f"{'tiny large: ' + key:28}{cells}")
    write_report(args.json, report)


if __name__ == "__main__":
    main()
