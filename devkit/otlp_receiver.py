"""A real OTLP/HTTP trace receiver on a free loopback port, for the span exporter's tests and benchmarks.

It does what a collector's OTLP/HTTP receiver does with traces: takes ``POST /v1/traces`` with an
``application/x-protobuf`` body (plain, gzip or deflate ``Content-Encoding``), decodes it as an
``ExportTraceServiceRequest`` and answers 200 with an empty ``ExportTraceServiceResponse``. What it
decoded is kept as plain :class:`ReceivedSpan` records, ids in lowercase hex as the service writes them.

Needs ``opentelemetry-proto`` (a dependency of the ``otel`` extra's exporter, and so of the ``dev``
extra)::

    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3)
"""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from types import TracebackType
from typing import Any, ClassVar, Final

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PbSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags, Status

from devkit.receiver import loopback_server

#: The path OTLP/HTTP sends traces to.
TRACES_PATH: Final = "/v1/traces"
_PROTOBUF: Final = "application/x-protobuf"
_MAX_BODY: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as the receiver decoded it."""

    name: str
    trace_id: str
    span_id: str
    #: None for a root span (OTLP's empty parent id).
    parent_span_id: str | None
    start_ns: int
    end_ns: int
    #: ``server``, ``internal``, ``client``, ``producer``, ``consumer`` or ``unspecified``.
    kind: str
    attributes: dict[str, object]
    #: ``unset``, ``ok`` or ``error``.
    status_code: str
    status_message: str
    #: The resource's ``service.name`` (None: the resource had none).
    service_name: str | None
    resource: dict[str, object] = field(default_factory=dict)
    #: The instrumentation scope's name.
    scope: str = ""
    #: Whether the parent is another process's span, when there is one and the sender said (OTLP's
    #: span flags).
    parent_is_remote: bool | None = None
    trace_state: str = ""


@dataclass(frozen=True)
class ReceivedRequest:
    """One export request that was taken: its headers (lower-case names) and how many spans it held."""

    headers: dict[str, str]
    spans: int


def _value(value: Any) -> object:
    """An OTLP ``AnyValue`` as the Python value it holds."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, which)


def _attributes(pairs: Any) -> dict[str, object]:
    return {kv.key: _value(kv.value) for kv in pairs}


def _kind(kind: int) -> str:
    return str(PbSpan.SpanKind.Name(kind)).removeprefix("SPAN_KIND_").lower()


def _parent_is_remote(flags: int) -> bool | None:
    if not flags & SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK:
        return None
    return bool(flags & SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK)


def decode(request: Any) -> list[ReceivedSpan]:
    """The spans of an ``ExportTraceServiceRequest``, in the order they came."""
    out: list[ReceivedSpan] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        service = resource.get("service.name")
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ReceivedSpan(
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano,
                        kind=_kind(span.kind),
                        attributes=_attributes(span.attributes),
                        status_code=str(Status.StatusCode.Name(span.status.code))
                        .removeprefix("STATUS_CODE_")
                        .lower(),
                        status_message=span.status.message,
                        service_name=service if isinstance(service, str) else None,
                        resource=resource,
                        scope=scope_spans.scope.name,
                        parent_is_remote=_parent_is_remote(span.flags) if span.parent_span_id else None,
                        trace_state=span.trace_state,
                    )
                )
    return out


class _Handler(BaseHTTPRequestHandler):
    """Serves one receiver (set on a subclass made for it)."""

    receiver: ClassVar[OtlpReceiver]

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != TRACES_PATH:
            self._answer(404, b"only POST /v1/traces is served\n", "text/plain")
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit() or int(length) > _MAX_BODY:
            self._answer(411, b"a Content-Length of at most 64 MiB is needed\n", "text/plain")
            return
        body = self.rfile.read(int(length))
        if self.headers.get_content_type() != _PROTOBUF:
            self._answer(415, b"only application/x-protobuf is accepted\n", "text/plain")
            return
        encoding = (self.headers.get("Content-Encoding") or "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding != "identity":
                raise ValueError(f"unknown Content-Encoding {encoding}")
            request = ExportTraceServiceRequest.FromString(body)
        except (OSError, EOFError, zlib.error, ValueError, DecodeError) as exc:
            self._answer(400, f"cannot read the body: {exc}\n".encode(), "text/plain")
            return
        self.receiver._took({k.lower(): v for k, v in self.headers.items()}, decode(request))
        self._answer(200, ExportTraceServiceResponse().SerializeToString(), _PROTOBUF)

    def do_GET(self) -> None:
        self._answer(405, b"POST only\n", "text/plain")

    def _answer(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class OtlpReceiver:
    """An OTLP/HTTP trace receiver on a free port of 127.0.0.1, serving (a thread per request) while its
    ``with`` block runs, or between :meth:`start` and :meth:`stop`."""

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._requests: list[ReceivedRequest] = []
        self._changed = threading.Condition()
        self._stack: ExitStack | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL (``http://127.0.0.1:PORT``): what ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set to."""
        if self._url is None:
            raise RuntimeError("the receiver is not started")
        return self._url

    @property
    def traces_url(self) -> str:
        """The full traces URL: what ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set to."""
        return self.url + TRACES_PATH

    def start(self) -> OtlpReceiver:
        if self._stack is not None:
            raise RuntimeError("the receiver is already started")
        handler = type("OtlpReceiverHandler", (_Handler,), {"receiver": self})
        with ExitStack() as stack:
            self._url = stack.enter_context(loopback_server(handler, path=""))
            self._stack = stack.pop_all()
        return self

    def stop(self) -> None:
        """Close the socket and join the server's thread (requests in flight may still be answered)."""
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _took(self, headers: dict[str, str], spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._requests.append(ReceivedRequest(headers, len(spans)))
            self._spans.extend(spans)
            self._changed.notify_all()

    def spans(self) -> list[ReceivedSpan]:
        """The spans received so far, in the order they came."""
        with self._changed:
            return list(self._spans)

    def requests(self) -> list[ReceivedRequest]:
        """The export requests taken so far."""
        with self._changed:
            return list(self._requests)

    def clear(self) -> None:
        with self._changed:
            self._spans.clear()
            self._requests.clear()

    def wait_for(
        self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 5.0
    ) -> list[ReceivedSpan]:
        """The spans received, once ``predicate`` holds for them; TimeoutError if it does not within
        ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(list(self._spans)):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(self._spans)} spans received in {timeout} s, and the condition does not hold"
                    )
                self._changed.wait(left)
            return list(self._spans)
