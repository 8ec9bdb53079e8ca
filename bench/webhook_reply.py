"""Webhook replies: the memory a delivery costs when its receiver answers 200 with a huge body.

    python -m bench.webhook_reply [--size 1073741824] [--deliveries 1] [--unbounded]
                                  [--json bench/results/webhook_reply.json]

Starts receivers on free loopback ports that answer every POST with ``200`` and ``--size`` bytes of
body (made as they are sent, so the receiver itself holds nothing), then, in this process:

1. ``--deliveries`` webhooks at once through :class:`~jobs.webhooks.WebhookSender` (private addresses
   allowed, one attempt each): whether each counted as delivered, the bytes of the body it read, the
   bytes the receiver managed to send before the connection was closed, and the growth of this
   process's peak resident memory (``VmHWM``) over what it was just before;
2. with ``--unbounded``, the same deliveries the way they were made before the sender streamed its
   answers (``httpx.AsyncClient.post``, which reads the whole body): the same figures, side by side.
   It needs about twice ``--size`` of free memory per delivery.

The peak is reset between the two (``/proc/self/clear_refs``) where the kernel allows it. Talks to
127.0.0.1 only. Target: the bounded sender grows the peak by under 50 MB whatever ``--size`` is.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import resource
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.report import write_report
from devkit.memory import resident_mib
from jobs.webhooks import REPLY_READ_LIMIT, WebhookSender

MB = 1024 * 1024
#: The growth the bounded sender must stay under.
TARGET_MB = 50.0


class HugeReplies:
    """A loopback server answering each request with 200 and ``size`` bytes of zeros, counting what
    it manages to send."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sent = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._threads: list[threading.Thread] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}/hook"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._answer, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _answer(self, conn: socket.socket) -> None:
        chunk = bytes(256 * 1024)
        with conn, conn.makefile("rb") as stream:
            length = 0
            while (line := stream.readline(65536)) not in (b"\r\n", b"\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            stream.read(length)
            try:
                conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {self.size}\r\n\r\n".encode())
                left = self.size
                while left > 0:
                    piece = chunk[: min(left, len(chunk))]
                    conn.sendall(piece)
                    left -= len(piece)
                    with self._lock:
                        self.sent += len(piece)
            except OSError:
                pass  # the client closed the connection

    def wait(self, timeout: float = 30.0) -> None:
        """Until every answer has ended (sent in full, or cut off by the client)."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        self._listener.close()


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (``VmHWM``; ``ru_maxrss`` where there is none)."""
    peak = resident_mib("self", "VmHWM")
    return peak if not math.isnan(peak) else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    now = resident_mib("self")
    return now if not math.isnan(now) else peak_rss_mb()


def reset_peak() -> bool:
    """Resets ``VmHWM`` to the current resident size (Linux 4.0+); False where it cannot."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


async def bounded(url: str) -> tuple[bool, int]:
    sender = WebhookSender(None, allow_private=True, attempts=1, timeout_s=60.0)
    result = await sender.attempt(url, b"{}", {"Content-Type": "application/json"})
    return result.outcome == "delivered", result.received


async def unbounded(url: str) -> tuple[bool, int]:
    """The delivery as it was made before: the whole answer read into memory."""
    async with httpx.AsyncClient(timeout=60.0, follow_redirects=False) as client:
        response = await client.post(url, content=b"{}", headers={"Content-Type": "application/json"})
        return 200 <= response.status_code < 300, len(response.content)


def measure(how: Callable[[str], Awaitable[tuple[bool, int]]], size: int, deliveries: int) -> dict[str, Any]:
    receivers = [HugeReplies(size) for _ in range(deliveries)]
    reset = reset_peak()
    before, peak_before = rss_mb(), peak_rss_mb()

    async def run() -> list[tuple[bool, int]]:
        return await asyncio.gather(*(how(r.url) for r in receivers))

    start = time.perf_counter()
    outcomes = asyncio.run(run())
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    for r in receivers:
        r.wait()
        r.close()
    return dict(
        delivered=sum(ok for ok, _ in outcomes),
        received_bytes=max(read for _, read in outcomes),
        receiver_sent_bytes=max(r.sent for r in receivers),
        rss_before_mb=before,
        peak_mb=peak,
        # Without a reset, the peak may predate this run: growth over the peak already reached.
        peak_growth_mb=peak - (before if reset else peak_before),
        seconds=seconds,
        peak_reset=reset,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1 << 30, help="bytes of each answer's body")
    ap.add_argument("--deliveries", type=int, default=1, help="deliveries at once, each to its own receiver")
    ap.add_argument("--unbounded", action="store_true", help="also measure the whole-body read of before")
    ap.add_argument("--json", type=Path, default=Path("bench/results/webhook_reply.json"))
    args = ap.parse_args()

    rows = {"streamed (WebhookSender)": measure(bounded, args.size, args.deliveries)}
    if args.unbounded:
        rows["whole body (httpx post)"] = measure(unbounded, args.size, args.deliveries)

    print(
        f"# webhook answered 200 with {args.size / MB:.0f} MiB of body, {args.deliveries} at once; "
        f"read limit {REPLY_READ_LIMIT} B"
    )
    print(
        f"{'delivery':26} {'delivered':>9} {'received B':>12} {'sent B':>12} {'RSS before':>11} "
        f"{'peak growth':>12} {'s':>6}"
    )
    for label, r in rows.items():
        print(
            f"{label:26} {r['delivered']:>9} {r['received_bytes']:>12} {r['receiver_sent_bytes']:>12} "
            f"{r['rss_before_mb']:>8.0f} MB {r['peak_growth_mb']:>9.1f} MB {r['seconds']:>6.2f}"
        )
    growth = rows["streamed (WebhookSender)"]["peak_growth_mb"]
    verdict = "within" if growth < TARGET_MB else "OVER"
    print(f"# streamed delivery: peak growth {growth:.1f} MB, {verdict} the {TARGET_MB:.0f} MB target")
    write_report(args.json, dict(size=args.size, deliveries=args.deliveries, target_mb=TARGET_MB, rows=rows))
    return 0 if growth < TARGET_MB else 1


if __name__ == "__main__":
    sys.exit(main())
