"""The OTLP span exporter (service/otel.py) against a real OTLP/HTTP receiver on a loopback port:
what reaches it is what the service recorded, ids and all; and without an endpoint or without the
``otel`` extra nothing of OpenTelemetry's SDK is built or imported."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devkit.otlp_receiver import OtlpReceiver
from service.otel import OtlpSpanExporter, build_exporter, resource_attributes, traces_endpoint
from serving.tracing import Span

ROOT = Path(__file__).resolve().parents[2]
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER = "00f067aa0ba902b7"  # the caller's span: the request's parent, in another process
REQUEST = "b7ad6b7169203331"
DECODE = "53995c3f42cd8ad8"
INFER = "e457b5a2e4d86bd1"
T0 = 1_760_000_000_123_456_789  # Unix-epoch nanoseconds


@pytest.fixture(autouse=True)
def _no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads its transport settings from the process environment: none of the developer's."""
    for name in list(os.environ):
        if name.startswith("OTEL_"):
            monkeypatch.delenv(name)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture
def exporters() -> Iterator[list[OtlpSpanExporter]]:
    """Exporters the test built, shut down (their sending threads stopped) afterwards."""
    built: list[OtlpSpanExporter] = []
    yield built
    for exporter in built:
        exporter.shutdown(timeout_s=1)


def _build(exporters: list[OtlpSpanExporter], environ: dict[str, str]) -> OtlpSpanExporter:
    exporter = build_exporter(environ=environ)
    assert exporter is not None
    exporters.append(exporter)
    return exporter


def _request_spans() -> list[Span]:
    """A request below its caller's span, and two stages below the request (the second one failed)."""
    return [
        Span(
            "POST /v1/cartoonize",
            TRACE,
            REQUEST,
            CALLER,
            T0,
            T0 + 41_000_000,
            kind="server",
            attributes={"http.request.method": "POST", "http.response.status_code": 500, "client": "a"},
            error="InferenceError: out of memory",
        ),
        Span("decode", TRACE, DECODE, REQUEST, T0 + 1_000, T0 + 3_500_000, attributes={"pixels": 921_600}),
        Span(
            "infer",
            TRACE,
            INFER,
            REQUEST,
            T0 + 3_600_000,
            T0 + 40_000_000,
            attributes={"style": "anime", "scale": 0.5, "on_gpu": False},
            error="InferenceError: out of memory",
        ),
    ]


def test_spans_reach_the_collector_with_the_services_own_ids(
    receiver: OtlpReceiver, exporters: list[OtlpSpanExporter]
) -> None:
    exporter = _build(exporters, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    for span in _request_spans():
        exporter.export(span)
    assert exporter.force_flush(2)
    got = {s.span_id: s for s in receiver.wait_for(lambda spans: len(spans) >= 3, 2)}
    assert len(receiver.spans()) == 3 and set(got) == {REQUEST, DECODE, INFER}
    assert {s.trace_id for s in got.values()} == {TRACE}
    assert {s.service_name for s in got.values()} == {"toonserve"}
    assert {s.scope for s in got.values()} == {"toonserve"}

    request, decode, infer = got[REQUEST], got[DECODE], got[INFER]
    assert (request.name, request.kind, request.parent_span_id) == ("POST /v1/cartoonize", "server", CALLER)
    assert request.parent_is_remote is True  # the caller's span is another process's
    assert (request.start_ns, request.end_ns) == (T0, T0 + 41_000_000)
    assert request.attributes == {
        "http.request.method": "POST",
        "http.response.status_code": 500,
        "client": "a",
    }
    assert (request.status_code, request.status_message) == ("error", "InferenceError: out of memory")

    assert (decode.name, decode.kind, decode.parent_span_id) == ("decode", "internal", REQUEST)
    assert decode.parent_is_remote is False
    assert (decode.start_ns, decode.end_ns) == (T0 + 1_000, T0 + 3_500_000)
    assert decode.attributes == {"pixels": 921_600}
    assert (decode.status_code, decode.status_message) == ("unset", "")

    assert (infer.name, infer.kind, infer.parent_span_id) == ("infer", "internal", REQUEST)
    assert (infer.start_ns, infer.end_ns) == (T0 + 3_600_000, T0 + 40_000_000)
    assert infer.attributes == {"style": "anime", "scale": 0.5, "on_gpu": False}
    assert (infer.status_code, infer.status_message) == ("error", "InferenceError: out of memory")


def test_a_root_span_and_a_client_span(receiver: OtlpReceiver, exporters: list[OtlpSpanExporter]) -> None:
    exporter = _build(exporters, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.traces_url})
    exporter.export(Span("POST /jobs", TRACE, REQUEST, None, T0, T0 + 5, kind="server"))
    exporter.export(Span("webhook", TRACE, DECODE, REQUEST, T0 + 1, T0 + 4, kind="client"))
    assert exporter.force_flush(2)
    root, call = receiver.wait_for(lambda spans: len(spans) >= 2, 2)
    assert (root.span_id, root.parent_span_id, root.parent_is_remote) == (REQUEST, None, None)
    assert (call.span_id, call.parent_span_id, call.kind) == (DECODE, REQUEST, "client")


def test_the_environment_names_the_service(receiver: OtlpReceiver, exporters: list[OtlpSpanExporter]) -> None:
    exporter = _build(
        exporters,
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url + "/",
            "OTEL_SERVICE_NAME": "toonserve-eu",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment=staging%20b",
        },
    )
    exporter.export(_request_spans()[1])
    assert exporter.force_flush(2)
    (span,) = receiver.wait_for(bool, 2)
    assert span.service_name == "toonserve-eu"
    assert span.resource["deployment.environment"] == "staging b"


def test_which_service_name_wins() -> None:
    assert resource_attributes("toonserve", {}) == {"service.name": "toonserve"}
    assert resource_attributes("toonserve", {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a, k = v "}) == {
        "service.name": "a",
        "k": "v",
    }
    both = {"OTEL_RESOURCE_ATTRIBUTES": "service.name=a", "OTEL_SERVICE_NAME": "b"}
    assert resource_attributes("toonserve", both)["service.name"] == "b"


def test_the_endpoint_as_the_specification_derives_it() -> None:
    assert traces_endpoint({}) is None
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "http://c:4318/v1/traces"
    assert traces_endpoint({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}) == "http://c:4318/v1/traces"
    both = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t/x",
    }
    assert traces_endpoint(both) == "http://t/x"  # used as it is


@pytest.mark.parametrize(
    ("environ", "warned"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "TRUE"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "zipkin"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "collector:4318"}, True),
    ],
)
def test_nothing_is_exported_unless_asked_for(
    environ: dict[str, str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "service.otel"):
        assert build_exporter(environ=environ) is None
    assert bool(caplog.records) is warned


def test_a_span_that_cannot_be_sent_is_dropped_and_the_rest_go_on(
    receiver: OtlpReceiver, exporters: list[OtlpSpanExporter], caplog: pytest.LogCaptureFixture
) -> None:
    exporter = _build(exporters, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    with caplog.at_level(logging.WARNING, "service.otel"):
        exporter.export(Span("bad id", "not hex", REQUEST, None, T0, T0 + 1))
        exporter.export(Span("short id", TRACE, "abc", None, T0, T0 + 1))
    assert [r.getMessage() for r in caplog.records] == ["span 'bad id' could not be exported (1 so far)"]
    odd = {"none": None, "huge": 2**70, "list": [1, 2], "ok": 1}
    exporter.export(Span("odd values", TRACE, REQUEST, None, T0, T0 + 1, attributes=odd))  # type: ignore[arg-type]
    assert exporter.force_flush(2)
    (span,) = receiver.wait_for(bool, 2)
    assert span.attributes == {"huge": str(2**70), "list": "[1, 2]", "ok": 1}

    exporter.shutdown()
    exporter.export(_request_spans()[0])  # after shutdown: dropped, quietly
    exporter.shutdown()  # again: nothing
    assert not exporter.force_flush(1) and len(receiver.spans()) == 1


def test_the_sdk_reads_its_transport_settings_from_the_process_environment(
    receiver: OtlpReceiver, exporters: list[OtlpSpanExporter], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20t0ken")
    exporter = _build(exporters, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url})
    exporter.export(_request_spans()[1])
    assert exporter.force_flush(2)
    receiver.wait_for(bool, 2)
    (request,) = receiver.requests()
    assert request.spans == 1
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["authorization"] == "Bearer t0ken"


def test_shutdown_does_not_wait_on_a_collector_that_never_answers(
    exporters: list[OtlpSpanExporter], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A listening socket that never accepts: the export hangs until the exporter's own timeout (4 s
    here, 10 s by default; it retries until then), and shutdown gives up on it after the time it was
    given (0.2 s). The bounds below are seconds from both, so neither a busy machine fails the test
    nor a shutdown that waits for the exporter passes it; the exporter's thread ends within the
    suite (with 30 s, it outlived it and logged at exit)."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "4")
    with socket.create_server(("127.0.0.1", 0)) as hole:
        url = f"http://127.0.0.1:{hole.getsockname()[1]}"
        exporter = build_exporter(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": url})
        assert exporter is not None
        started = time.perf_counter()
        for span in _request_spans():
            exporter.export(span)  # queued: returns at once
        assert time.perf_counter() - started < 1.5
        with caplog.at_level(logging.WARNING, "service.otel"):
            exporter.shutdown(timeout_s=0.2)
        assert time.perf_counter() - started < 3
        assert "lost" in caplog.records[-1].getMessage()


def test_the_receiver_takes_protobuf_only(receiver: OtlpReceiver) -> None:
    with httpx.Client() as client:
        json_body = client.post(receiver.traces_url, json={"resourceSpans": []})
        assert json_body.status_code == 415
        garbage = client.post(
            receiver.traces_url, content=b"\xff\xff", headers={"Content-Type": "application/x-protobuf"}
        )
        assert garbage.status_code == 400
        empty = client.post(
            receiver.traces_url, content=b"", headers={"Content-Type": "application/x-protobuf"}
        )
        assert empty.status_code == 200 and empty.content == b""
        assert client.post(receiver.url + "/v1/logs", content=b"").status_code == 404
    assert receiver.spans() == [] and len(receiver.requests()) == 1


_IMPORTS = """
import json, logging, sys
def otel(): return sorted(m for m in sys.modules if m.startswith("opentelemetry"))
import service.otel
out = {"otel": otel(), "none": service.otel.build_exporter(environ={}) is None}
import fastapi, redis
out["dependencies"] = otel()
import service.app
out["app"] = otel()
print(json.dumps(out))
"""

_MISSING = """
import logging, sys
for name in ("opentelemetry.sdk", "opentelemetry.exporter"):
    sys.modules[name] = None  # as if the otel extra were not installed
logging.basicConfig(format="%(levelname)s %(message)s")
import service.otel
assert service.otel.build_exporter(environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}) is None
"""


def _python(code: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


@pytest.mark.slow  # a fresh interpreter importing the app: about 2.5 s
def test_without_an_endpoint_nothing_of_opentelemetry_is_imported() -> None:
    """service.otel imports nothing of OpenTelemetry, nor does build_exporter without an endpoint; and
    the app imports no more of it than its dependencies do by themselves: FastAPI imports
    opentelemetry-api (a dependency of it) and redis-py the SDK's metrics when the SDK is installed.
    The SDK's tracing, the exporter and the protobuf classes are never imported."""
    seen = json.loads(_python(_IMPORTS).stdout)
    assert seen["otel"] == [] and seen["none"] is True
    assert seen["app"] == seen["dependencies"]
    exporting = ("opentelemetry.sdk.trace", "opentelemetry.exporter", "opentelemetry.proto")
    assert [m for m in seen["app"] if m.startswith(exporting)] == []


def test_without_the_extra_an_endpoint_gets_a_warning() -> None:
    warned = _python(_MISSING).stderr
    assert "WARNING" in warned and "install toonserve[otel]" in warned
