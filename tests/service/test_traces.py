"""Spans to a real OTLP/HTTP receiver: a request and its stages, a job's items, under the caller's
trace, with the ids its log lines carry; nothing exported without the endpoint."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.otlp_receiver import OtlpReceiver, ReceivedSpan
from devkit.reference_graphs import ReferenceModelDir
from service.app import create_app
from service.logs import configure
from serving import tracing
from serving.flow import TIMINGS
from tests.api.conftest import jobs_settings, small_jpeg, unseen_portrait, wait_ready

# Services exporting to a real receiver: a few seconds; the exporter alone is in test_otel.py.
pytestmark = pytest.mark.slow


CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
STAGES = TIMINGS


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", rx.url)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "toonserve-test")
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")  # milliseconds between batches
        yield rx


def _below(spans: list[ReceivedSpan], parent: str) -> dict[str, ReceivedSpan]:
    return {s.name: s for s in spans if s.parent_span_id == parent}


def test_a_request_and_its_stages_are_spans_in_the_callers_trace(
    receiver: OtlpReceiver,
    restore_logging: None,
    capsys: pytest.CaptureFixture[str],
    model_dir: ReferenceModelDir,
    tmp_path: Path,
) -> None:
    configure("info", "json")
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01", "tracestate": "congo=t61rcWkgMzE"}
    with TestClient(create_app(jobs_settings(model_dir, tmp_path, log_format="json"))) as client:
        wait_ready(client)
        assert tracing.exporting()
        photo = unseen_portrait()
        r = client.post("/cartoonize", files={"image": ("me.jpg", photo)}, headers=headers)
        assert r.status_code == 200 and r.headers["x-cache"] == "miss"
        hit = client.post(
            "/cartoonize", files={"image": ("me.jpg", photo)}, data={"strength": "0.5"}, headers=headers
        )
        assert hit.headers["x-cache"] == "hit"
        spans = receiver.wait_for(
            lambda got: (
                sum(s.name == "POST /cartoonize" for s in got) == 2
                and sum(s.name == "encode" for s in got) == 2
            )
        )
    assert not tracing.exporting()  # the app's exporter is gone with the app
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]

    servers = [s for s in spans if s.name == "POST /cartoonize"]
    assert {s.trace_id for s in servers} == {CALLER_TRACE}
    assert {s.parent_span_id for s in servers} == {CALLER_SPAN} and all(s.parent_is_remote for s in servers)
    first, second = sorted(servers, key=lambda s: s.start_ns)
    assert first.kind == "server" and first.service_name == "toonserve-test"
    assert first.attributes["http.response.status_code"] == 200
    assert (
        first.attributes["http.route"] == "/cartoonize"
        and first.attributes["toonserve.client"] == "anonymous"
    )
    # Every stage of the first, in order, inside the request's span.
    stages = _below(spans, first.span_id)
    assert set(stages) == set(STAGES)
    assert all(s.trace_id == CALLER_TRACE and s.kind == "internal" for s in stages.values())
    assert all(first.start_ns <= s.start_ns <= s.end_ns <= first.end_ns for s in stages.values())
    assert stages["decode"].end_ns <= stages["resize"].start_ns <= stages["background"].start_ns
    assert stages["head"].end_ns <= stages["blend"].start_ns <= stages["encode"].start_ns
    # The hit ran only the last steps.
    assert set(_below(spans, second.span_id)) == {"strength", "resize_out", "encode"}
    # The request's log lines carry its trace and the span id the collector got.
    access = [x for x in lines if x.get("path") == "/cartoonize"]
    assert {(x["trace_id"], x["span_id"]) for x in access} == {
        (CALLER_TRACE, first.span_id),
        (CALLER_TRACE, second.span_id),
    }


def test_a_jobs_items_are_spans_below_the_request_that_made_it(
    receiver: OtlpReceiver, model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    headers = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    with TestClient(create_app(jobs_settings(model_dir, tmp_path))) as client:
        wait_ready(client)
        files = [("images", (f"{i}.jpg", unseen_portrait())) for i in range(2)]
        r = client.post("/jobs", files=files, headers=headers)
        assert r.status_code == 202
        spans = receiver.wait_for(lambda got: sum(s.name == "job item" for s in got) == 2, timeout=60)
    (posted,) = [s for s in spans if s.name == "POST /jobs"]
    assert posted.trace_id == CALLER_TRACE and posted.parent_span_id == CALLER_SPAN
    items = [s for s in spans if s.name == "job item"]
    assert {s.parent_span_id for s in items} == {posted.span_id}
    assert {s.attributes["toonserve.item"] for s in items} == {0, 1}
    for item in items:
        assert {"background", "head", "encode"} <= set(_below(spans, item.span_id))


def test_nothing_is_exported_without_an_endpoint(
    monkeypatch: pytest.MonkeyPatch, model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    with OtlpReceiver() as rx, TestClient(create_app(jobs_settings(model_dir, tmp_path))) as client:
        wait_ready(client)
        assert not tracing.exporting()
        assert (
            client.post(
                "/cartoonize", files={"image": ("me.jpg", small_jpeg(photos.grace_hopper()))}
            ).status_code
            == 200
        )
        time.sleep(0.3)
        assert rx.spans() == []
