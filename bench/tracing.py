"""What exporting traces costs a request: p50 with spans sent to a real OTLP/HTTP collector against
the same service exporting nothing, in the same run.

    python -m bench.tracing [--requests 60] [--json bench/results/tracing.json]

Three ``toonserve serve`` processes with the default settings but the result cache off (every request
runs the models, as a first request does) on free loopback ports and the synthetic anime model: one
with ``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at a real receiver (``devkit/otlp_receiver.py``, which
decodes every batch), two without: the second untraced one is the control, whose ratio to the first
shows how far two identical services differ here (the noise floor of the comparison). The same
1024×768 one-face JPEG is sent to them in turns, one request at a time, so all see the same machine;
each request carries a ``traceparent``. Prints the p50 and p90 of each and the ratios (target: p50
within 2 %), and checks that the traced one's spans arrived (one server span and its stages per
request); writes JSON.

Two services differ by a few per cent from run to run on a small machine, more than exporting costs,
so the bench also times the exporting itself in this process: a request's spans (a server span and
its eleven stages) recorded and handed to the exporter, against the request's p50.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import secrets
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch
from PIL import Image

from bench.report import write_report
from devkit.otlp_receiver import OtlpReceiver
from devkit.photos import one_face_1024x768
from devkit.reference_graphs import write_fast_model_dir
from devkit.serve import LiveService, service_env
from service.otel import build_exporter
from serving import tracing
from serving.flow import TIMINGS
from serving.tracing import TraceContext, new_trace

#: The spans of one request the models run on.
_STAGES = TIMINGS


def export_cost_us(url: str, requests: int = 2000) -> float:
    """Microseconds this process spends recording and handing over one request's spans (the server
    span and one per stage) to an OTLP exporter sending to ``url``."""
    exporter = build_exporter(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": url})
    assert exporter is not None, "the otel extra is not installed"
    previous = tracing.set_exporter(exporter)
    try:
        start = time.perf_counter()
        for _ in range(requests):
            request: TraceContext = new_trace().child()
            now = tracing.now_ns()
            for stage in _STAGES:
                tracing.emit_child(request, stage, now, now + 1000)
            tracing.emit_own(
                request,
                "POST /cartoonize",
                now,
                now + 2000,
                kind="server",
                attributes={"http.route": "/cartoonize"},
            )
        return (time.perf_counter() - start) * 1e6 / requests
    finally:
        tracing.set_exporter(previous)
        exporter.shutdown()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--json", type=Path, default=Path("bench/results/tracing.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="toonserve-bench-"))
    write_fast_model_dir(tmp / "models" / "anime")
    buf = io.BytesIO()
    Image.fromarray(one_face_1024x768()).save(buf, "JPEG", quality=92)
    photo = buf.getvalue()
    names = ("off", "on", "off again")
    times: dict[str, list[float]] = {name: [] for name in names}
    with OtlpReceiver() as receiver:
        servers = {
            "off": LiveService(
                service_env(tmp / "models", tmp / "off", TOONSERVE_RESULT_CACHE_BYTES="0"), tmp / "off.log"
            ),
            "off again": LiveService(
                service_env(tmp / "models", tmp / "off2", TOONSERVE_RESULT_CACHE_BYTES="0"), tmp / "off2.log"
            ),
            "on": LiveService(
                service_env(
                    tmp / "models",
                    tmp / "on",
                    TOONSERVE_RESULT_CACHE_BYTES="0",
                    OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url,
                    OTEL_SERVICE_NAME="toonserve-bench",
                ),
                tmp / "on.log",
            ),
        }
        for server in servers.values():
            server.launch()
        try:
            for server in servers.values():
                server.wait_ready()
            clients = {name: httpx.Client(base_url=s.url, timeout=120) for name, s in servers.items()}
            for i in range(args.requests + 2):
                # Turns rotate which goes first, so none always follows another's work.
                for name in names[i % 3 :] + names[: i % 3]:
                    headers = {"traceparent": f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"}
                    start = time.perf_counter()
                    r = clients[name].post(
                        "/cartoonize", files={"image": ("me.jpg", photo, "image/jpeg")}, headers=headers
                    )
                    r.raise_for_status()
                    if i >= 2:  # two warm-ups each
                        times[name].append((time.perf_counter() - start) * 1000)
            for client in clients.values():
                client.close()
            total = args.requests + 2
            spans = receiver.wait_for(
                lambda got: sum(s.name == "POST /cartoonize" for s in got) >= total, timeout=30
            )
        finally:
            for server in servers.values():
                server.stop()
        cost_us = export_cost_us(receiver.url)
    p50 = {name: statistics.median(t) for name, t in times.items()}
    p90 = {name: statistics.quantiles(t, n=10)[-1] for name, t in times.items()}
    per_request = len(spans) / total
    ratio = p50["on"] / p50["off"]
    control = p50["off again"] / p50["off"]
    info = dict(python=platform.python_version(), torch=torch.__version__, requests=args.requests)
    print(f"# tracing benchmark  {json.dumps(info)}")
    print(f"{'spans exported':16} {'p50 ms':>8} {'p90 ms':>8}")
    for name in names:
        print(f"{name:16} {p50[name]:8.1f} {p90[name]:8.1f}")
    print(
        f"# p50 on/off: {ratio:.3f} (target ≤ 1.02); control (off again)/off: {control:.3f}; "
        f"{per_request:.1f} spans a request reached the collector"
    )
    print(
        f"# recording and handing over one request's {len(_STAGES) + 1} spans: {cost_us:.0f} µs, "
        f"{cost_us / 1000 / p50['off'] * 100:.3f} % of the untraced p50"
    )
    write_report(
        args.json,
        {
            "info": info,
            "p50_ms": p50,
            "p90_ms": p90,
            "ratio_p50": ratio,
            "control_ratio_p50": control,
            "spans_per_request": per_request,
            "export_us_per_request": cost_us,
        },
    )
    return 0 if ratio <= 1.02 else 1


if __name__ == "__main__":
    raise SystemExit(main())
