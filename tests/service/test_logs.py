"""The service's log set-up: JSON lines, and third-party loggers brought into that format."""

from __future__ import annotations

import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import ClassVar

import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.receiver import loopback_server
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from service.logs import configure
from tests.api.conftest import jobs_settings, small_jpeg, wait_ready


def test_modelscope_lines_come_out_as_our_json(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info", "json")
    from modelscope.utils.logger import get_logger

    # What the hub client does on every import: fetch its logger (which turns propagation off again).
    get_logger().warning("Downloading [cartoon_h.pb]")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    entry = next(x for x in lines if x["message"] == "Downloading [cartoon_h.pb]")
    assert entry["logger"] == "modelscope" and entry["level"] == "warning" and "request_id" in entry
    from modelscope_hub.utils.logger import get_logger as hub_logger

    hub_logger("legacy_api").warning("listing failed, retry in 1s")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert [x["logger"] for x in lines if x["message"] == "listing failed, retry in 1s"] == [
        "modelscope_hub.legacy_api"
    ]


class _Refusing(BaseHTTPRequestHandler):
    """A webhook receiver that keeps the headers it was sent and answers 500."""

    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).seen.append(dict(self.headers))
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_a_jobs_work_goes_on_in_the_trace_of_the_request_that_made_it(
    restore_logging: None, capsys: pytest.CaptureFixture[str], model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    """The caller's traceparent: the POST /jobs is a span below it, and so are the job's items and its
    webhook delivery, whose request carries its span on to the receiver. Their log lines name the job,
    the client, the trace and their own span."""
    configure("info", "json")
    settings = jobs_settings(
        model_dir,
        tmp_path,
        api_keys="alice=a-key",
        webhook_secret="whsec",
        webhook_allow_private=True,
        webhook_attempts=1,
        log_format="json",
    )
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {
        "X-API-Key": "a-key",
        "traceparent": f"00-{caller_trace}-{caller_span}-01",
        "tracestate": "congo=t61rcWkgMzE",
    }
    _Refusing.seen = []
    with loopback_server(_Refusing) as hook, TestClient(create_app(settings)) as client:
        wait_ready(client)
        photo = small_jpeg(photos.astronaut(), 96)
        r = client.post(
            "/jobs", files=[("images", ("a.jpg", photo))], data={"webhook": hook}, headers=headers
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        lines: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            lines += [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
            if any("not delivered" in x["message"] for x in lines):
                break
            time.sleep(0.1)
    posted = next(x for x in lines if x.get("path") == "/jobs" and x.get("method") == "POST")
    assert posted["client"] == "alice" and posted["request_id"] != "-"
    assert posted["trace_id"] == caller_trace and posted["span_id"] != caller_span
    webhook = [x for x in lines if f"webhook of job {job_id}" in x["message"]]
    assert webhook and all(
        x["request_id"] == f"job:{job_id}:webhook" and x["client"] == "alice" for x in webhook
    )
    assert all(x["trace_id"] == caller_trace for x in webhook)
    assert {x["span_id"] for x in webhook}.isdisjoint({caller_span, posted["span_id"]})
    (sent,) = _Refusing.seen
    assert sent["traceparent"] == f"00-{caller_trace}-{webhook[0]['span_id']}-01"
    assert sent["tracestate"] == "congo=t61rcWkgMzE"
    # A request without a traceparent starts a trace of its own; work of no request has none.
    own = [x for x in lines if x.get("path") == "/readyz"]
    assert own and all(len(x["trace_id"]) == 32 and x["trace_id"] != caller_trace for x in own)
    assert any("trace_id" not in x for x in lines if x["logger"] != "toonserve.access")
