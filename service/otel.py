"""Exporting the service's spans to an OpenTelemetry collector over OTLP/HTTP (protobuf).

Optional: the exporter needs the ``otel`` extra (``pip install 'toonserve[otel]'``: the OpenTelemetry
SDK and its OTLP/HTTP exporter, with requests and the generated protobuf classes), which a service
that exports nothing should not have to install or import. So this module imports nothing of
OpenTelemetry itself; :func:`build_exporter` imports the SDK only once it has decided to export. (The
``opentelemetry-api`` package is there anyway, as a dependency of FastAPI, but the API alone cannot
export anything.)

The spans are the service's own (:mod:`serving.tracing`): recorded after the fact with the trace,
span and parent ids it gave them, the ones its log lines and its ``traceparent`` headers carry.
They go to the collector with exactly those ids; the SDK's tracer, which would make ids of its own,
is not used, and no global tracer provider is installed.

What :func:`build_exporter` reads from ``environ`` (the process environment unless given):

- ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (the URL, used as it is) or else ``OTEL_EXPORTER_OTLP_ENDPOINT``
  (a base URL, ``/v1/traces`` appended): where to send. Neither set: nothing is exported.
- ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none``: nothing is exported. Another
  ``OTEL_TRACES_EXPORTER`` than ``otlp``, or an ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` other than
  ``http/protobuf``, is not one this module speaks: a warning, and nothing is exported.
- ``OTEL_SERVICE_NAME``, and ``OTEL_RESOURCE_ATTRIBUTES`` (``key=value,...``, values percent-encoded):
  the resource the spans belong to. ``service.name`` is ``OTEL_SERVICE_NAME``, else the one in
  ``OTEL_RESOURCE_ATTRIBUTES``, else the ``service_name`` argument (``toonserve``).

The SDK itself reads the rest from the process environment: the exporter's
``OTEL_EXPORTER_OTLP[_TRACES]_HEADERS``, ``..._TIMEOUT`` (in seconds in the Python SDK, not the
specification's milliseconds), ``..._COMPRESSION`` (``gzip``, ``deflate``), ``..._CERTIFICATE``,
``..._CLIENT_KEY`` and ``..._CLIENT_CERTIFICATE``, and the batch processor's ``OTEL_BSP_SCHEDULE_DELAY``,
``OTEL_BSP_MAX_QUEUE_SIZE``, ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE``.

Spans are queued and sent in batches from the SDK's own thread, so :meth:`OtlpSpanExporter.export`
never waits on the network; when the queue is full (the collector is slow or gone) spans are dropped.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final
from urllib.parse import unquote

from serving.tracing import AttributeValue, Span

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

log = logging.getLogger(__name__)

#: The seconds :meth:`OtlpSpanExporter.shutdown` waits for the queued spans to be sent.
SHUTDOWN_TIMEOUT_S: Final = 5.0
#: The protocol of the exporter this module builds (the only value of ``OTEL_EXPORTER_OTLP_PROTOCOL``
#: it accepts).
PROTOCOL: Final = "http/protobuf"
_TRACES_PATH: Final = "v1/traces"
_INT64: Final = range(-(2**63), 2**63)


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def traces_endpoint(environ: Mapping[str, str] = os.environ) -> str | None:
    """The URL spans are sent to, as the OTLP exporter specification derives it, or None (not set)."""
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return endpoint
    if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return f"{base.removesuffix('/')}/{_TRACES_PATH}"
    return None


def resource_attributes(service_name: str, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The resource's attributes: ``OTEL_RESOURCE_ATTRIBUTES``, with ``service.name`` from
    ``OTEL_SERVICE_NAME`` or else from them or else ``service_name``."""
    attributes: dict[str, str] = {}
    for item in environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
        elif item.strip():
            log.warning("OTEL_RESOURCE_ATTRIBUTES: %r is not key=value; ignored", item.strip())
    named = environ.get("OTEL_SERVICE_NAME", "").strip()
    attributes["service.name"] = named or attributes.get("service.name") or service_name
    return attributes


def build_exporter(
    service_name: str = "toonserve", environ: Mapping[str, str] = os.environ
) -> OtlpSpanExporter | None:
    """The span exporter that ``environ`` asks for (see the module's docstring), or None: export is not
    configured, is turned off, or needs the ``otel`` extra, which is not installed (then a warning
    says so). Nothing of OpenTelemetry is imported when it returns None for want of an endpoint.

    The exporter's sending thread starts here; :meth:`OtlpSpanExporter.shutdown` stops it."""
    endpoint = traces_endpoint(environ)
    if endpoint is None or _true(environ.get("OTEL_SDK_DISABLED")):
        return None
    chosen = [x.strip().lower() for x in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")]
    if "none" in chosen:
        return None
    if "otlp" not in chosen:
        log.warning(
            "OTEL_TRACES_EXPORTER=%s: this service exports spans with otlp only; spans are not exported",
            environ["OTEL_TRACES_EXPORTER"],
        )
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
        or PROTOCOL
    )
    if protocol != PROTOCOL:
        log.warning(
            "OTLP protocol %s: this service sends spans over %s only; spans are not exported",
            protocol,
            PROTOCOL,
        )
        return None
    if not endpoint.startswith(("http://", "https://")):
        log.warning("OTLP traces endpoint %r is not an http(s) URL; spans are not exported", endpoint)
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "an OTLP endpoint is set (%s) but the OpenTelemetry SDK is not installed (%s): "
            "install toonserve[otel] to export spans; spans are not exported",
            endpoint,
            exc,
        )
        return None
    # Attributes given to Resource.create win over the ones it reads from the process environment,
    # so the environment's service name is resolved first (resource_attributes).
    resource = Resource.create(resource_attributes(service_name, environ))
    processor = BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint))
    log.info("exporting spans to %s over OTLP/HTTP (protobuf)", endpoint)
    return OtlpSpanExporter(processor, resource)


def _attribute(value: object) -> AttributeValue | None:
    """A value OTLP can carry (one that cannot be encoded would lose the whole batch): a string, a
    bool, a float or a 64-bit int as it is; None dropped; anything else as its string."""
    if isinstance(value, str | bool | float) or (isinstance(value, int) and value in _INT64):
        return value
    return None if value is None else str(value)


class OtlpSpanExporter:
    """A :class:`serving.tracing.SpanExporter` that queues spans, as SDK spans with the service's own
    ids, for a span processor (a ``BatchSpanProcessor`` in front of the OTLP/HTTP exporter, from
    :func:`build_exporter`)."""

    def __init__(self, processor: SpanProcessor, resource: Resource) -> None:
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

        self._processor = processor
        self._resource = resource
        self._scope: InstrumentationScope = InstrumentationScope("toonserve")
        self._readable_span: type[ReadableSpan] = ReadableSpan
        self._span_context: type[SpanContext] = SpanContext
        self._status: type[Status] = Status
        self._error: StatusCode = StatusCode.ERROR
        self._unset: Status = Status(StatusCode.UNSET)
        self._sampled: TraceFlags = TraceFlags(TraceFlags.SAMPLED)
        self._kinds: Mapping[str, SpanKind] = {
            "server": SpanKind.SERVER,
            "internal": SpanKind.INTERNAL,
            "client": SpanKind.CLIENT,
        }
        self._closed = False
        self._close_lock = threading.Lock()
        self._failures = 0

    def _context(self, trace_id: int, span_id: str, *, remote: bool) -> SpanContext:
        if len(span_id) != 16:
            raise ValueError(f"span id {span_id!r} is not 16 hex digits")
        return self._span_context(trace_id, int(span_id, 16), is_remote=remote, trace_flags=self._sampled)

    def readable(self, span: Span) -> ReadableSpan:
        """``span`` as the SDK's finished span, with its ids as they are. Its parent is taken for a
        remote one (another process's) when ``span`` is a server span: the caller's."""
        if len(span.trace_id) != 32:
            raise ValueError(f"trace id {span.trace_id!r} is not 32 hex digits")
        trace_id = int(span.trace_id, 16)
        parent = (
            None
            if span.parent_id is None
            else self._context(trace_id, span.parent_id, remote=span.kind == "server")
        )
        attributes: dict[str, AttributeValue] = {}
        for key, value in span.attributes.items():
            if (kept := _attribute(value)) is not None:
                attributes[key] = kept
        return self._readable_span(
            name=span.name,
            context=self._context(trace_id, span.span_id, remote=False),
            parent=parent,
            resource=self._resource,
            attributes=attributes,
            kind=self._kinds[span.kind],
            status=self._unset if span.error is None else self._status(self._error, span.error),
            start_time=span.start_ns,
            end_time=span.end_ns,
            instrumentation_scope=self._scope,
        )

    def export(self, span: Span) -> None:
        """Queue ``span`` to be sent; returns at once and never raises (a span that cannot be
        converted is dropped with a warning, the first time, and counted)."""
        if self._closed:
            return
        try:
            self._processor.on_end(self.readable(span))
        except Exception:
            self._failures += 1
            log_at: Callable[..., None] = log.warning if self._failures == 1 else log.debug
            log_at("span %r could not be exported (%d so far)", span.name, self._failures, exc_info=True)

    def force_flush(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> bool:
        """Send what is queued; whether that was done within ``timeout_s`` seconds. (The SDK's own
        flush waits for as long as the export takes, whatever timeout it is given: it is run in a
        thread of its own and waited for here.)"""
        if self._closed:
            return False
        return self._within(timeout_s, "flush", lambda: self._processor.force_flush())

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Send what is queued, within ``timeout_s`` seconds (what is not sent by then is lost), and
        stop the sending thread. Spans exported after it are dropped. Idempotent."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True

        def close() -> bool:
            try:
                self._processor.force_flush()
            finally:
                self._processor.shutdown()
            return True

        if not self._within(timeout_s, "shutdown", close):
            log.warning("spans not sent within %.1f s of shutdown are lost", timeout_s)

    def _within(self, timeout_s: float, what: str, work: Callable[[], bool]) -> bool:
        done: list[bool] = []

        def run() -> None:
            try:
                done.append(work())
            except Exception:
                log.warning("span exporter %s failed", what, exc_info=True)
                done.append(False)

        thread = threading.Thread(target=run, name=f"otlp-span-{what}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        return bool(done and done[0])
