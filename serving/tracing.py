"""W3C Trace Context: the ``traceparent`` and ``tracestate`` a caller sends, carried through the work
it starts (its log lines, its job's items, its job's webhook).

``traceparent`` is ``<version>-<trace-id>-<parent-id>-<flags>``: version ``00`` (two hex digits, never
``ff``), a trace id of 32 and a parent (span) id of 16 lowercase hex digits, neither all zeros, and
two hex digits of flags (bit 0: sampled). A header of a later version is read for its first four
fields when it has at least them, as the recommendation asks. A header that cannot be read is
ignored, and so is its ``tracestate``: the work then starts a trace of its own.

Each piece of work is a span of its own: a request's span is a child of the caller's (same trace id,
a new span id); a job item's and a webhook delivery's spans are children of the span of the
``POST /jobs`` that created the job. The webhook request carries ``traceparent`` (and ``tracestate``)
to its receiver, so the trace goes on there.

Spans can also be *exported* (to an OpenTelemetry collector: ``service/otel.py`` builds that
exporter when the optional ``toonserve[otel]`` extra is installed and ``OTEL_EXPORTER_OTLP_ENDPOINT``
is set). The service records its spans here as plain :class:`Span` values, after the fact and with
their real start and end times (a request's, and below it one per stage: decode, queue, each
pipeline stage, encode), and hands them to the one process-wide :class:`SpanExporter`, if any
(:func:`set_exporter`). Without one, :func:`emit` does nothing and nothing of OpenTelemetry is
imported.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Final, Literal, Protocol

log = logging.getLogger(__name__)

_TRACEPARENT: Final = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
#: The longest tracestate kept (the recommendation's 32 members of at most 256 characters, and more
#: than a proxy needs); a longer one is dropped, not cut (a cut one could be misread).
MAX_TRACESTATE: Final = 512
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


@dataclass(frozen=True)
class TraceContext:
    """Where a piece of work sits in a trace: its trace, its own span, the flags and state passed on."""

    trace_id: str
    span_id: str
    flags: str = "01"
    state: str = ""
    #: The span this one is below (the caller's, or the request's for a job item); None: a root.
    parent_id: str | None = None

    @property
    def traceparent(self) -> str:
        """This span as the ``traceparent`` of the work it calls (a webhook's receiver)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """A new span in the same trace, below this one."""
        return replace(self, span_id=_new_span_id(), parent_id=self.span_id)

    def headers(self) -> dict[str, str]:
        """The headers that carry this span to what it calls."""
        out = {"traceparent": self.traceparent}
        if self.state:
            out["tracestate"] = self.state
        return out


def _new_span_id() -> str:
    while (span := secrets.token_hex(8)) == _ZERO_SPAN:
        pass  # pragma: no cover - one chance in 2**64
    return span


def new_trace() -> TraceContext:
    """The root span of a trace of its own (sampled)."""
    while (trace := secrets.token_hex(16)) == _ZERO_TRACE:
        pass  # pragma: no cover - one chance in 2**128
    return TraceContext(trace, _new_span_id())


def parse(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The caller's span from its headers, or None when ``traceparent`` is missing or cannot be read."""
    if not traceparent:
        return None
    found = _TRACEPARENT.match(traceparent.strip())
    if found is None:
        return None
    version, trace_id, span_id, flags, rest = found.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    state = (tracestate or "").strip()
    if len(state) > MAX_TRACESTATE or any(ord(c) < 0x20 or ord(c) > 0x7E for c in state):
        state = ""
    return TraceContext(trace_id, span_id, flags, state)


def for_request(traceparent: str | None, tracestate: str | None = None) -> TraceContext:
    """A request's own span: a child of the caller's when it sent one that reads, else a new trace."""
    caller = parse(traceparent, tracestate)
    return caller.child() if caller is not None else new_trace()


#: What a span is to its trace: the work a server did for a caller, a step inside it, or a call out.
SpanKind = Literal["server", "internal", "client"]
#: Attribute values a span carries (OpenTelemetry's scalar types).
AttributeValue = str | int | float | bool


@dataclass(frozen=True)
class Span:
    """One finished span: ``[start_ns, end_ns)`` in Unix-epoch nanoseconds (``time.time_ns()``),
    in ``trace_id`` (32 hex digits), ``span_id`` (16 hex digits) below ``parent_id`` (None: a root)."""

    name: str
    trace_id: str
    span_id: str
    parent_id: str | None
    start_ns: int
    end_ns: int
    kind: SpanKind = "internal"
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)
    #: Set when the work failed: what went wrong (the span's status is then an error).
    error: str | None = None


class SpanExporter(Protocol):
    """Takes finished spans. ``export`` is called from any thread (the event loop among them) and must
    not block: it queues the span and returns."""

    def export(self, span: Span) -> None: ...

    def shutdown(self) -> None:
        """Send what is queued (within a few seconds) and stop."""


_exporter: SpanExporter | None = None
_exporter_lock = threading.Lock()


def set_exporter(exporter: SpanExporter | None) -> SpanExporter | None:
    """Install the process's span exporter (None: spans are not exported); returns the previous one."""
    global _exporter
    with _exporter_lock:
        previous, _exporter = _exporter, exporter
    return previous


def exporting() -> bool:
    """Whether spans go anywhere (so callers can skip building them)."""
    return _exporter is not None


def emit(span: Span) -> None:
    """Hand a finished span to the exporter, if one is installed; never raises."""
    exporter = _exporter
    if exporter is None:
        return
    try:
        exporter.export(span)
    except Exception:  # an exporter's failure must never fail the work it describes
        log.warning("a span could not be exported", exc_info=True)


def now_ns() -> int:
    """The current time as spans count it (Unix-epoch nanoseconds)."""
    return time.time_ns()


def emit_own(
    context: TraceContext | None,
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
    error: str | None = None,
) -> None:
    """The span of the work ``context`` is (a request's, a job item's), below its parent."""
    if context is None or _exporter is None:
        return
    emit(
        Span(
            name,
            context.trace_id,
            context.span_id,
            context.parent_id,
            start_ns,
            max(start_ns, end_ns),
            kind,
            dict(attributes or {}),
            error,
        )
    )


def emit_child(
    parent: TraceContext | None,
    name: str,
    start_ns: int,
    end_ns: int,
    *,
    attributes: Mapping[str, AttributeValue] | None = None,
    error: str | None = None,
) -> None:
    """A span below ``parent`` (nothing when ``parent`` is None or nothing is exported)."""
    if parent is None or _exporter is None:
        return
    emit(
        Span(
            name,
            parent.trace_id,
            _new_span_id(),
            parent.span_id,
            start_ns,
            max(start_ns, end_ns),
            attributes=dict(attributes or {}),
            error=error,
        )
    )


@contextmanager
def spanned_own(
    context: TraceContext | None,
    name: str,
    *,
    kind: SpanKind = "internal",
    attributes: Mapping[str, AttributeValue] | None = None,
) -> Iterator[None]:
    """Time the block as the span of the work ``context`` is (its error recorded if it raises)."""
    if context is None or _exporter is None:
        yield
        return
    start = now_ns()
    error: str | None = None
    try:
        yield
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        emit_own(context, name, start, now_ns(), kind=kind, attributes=attributes, error=error)
