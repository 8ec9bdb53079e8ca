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
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, replace
from typing import Final

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

    @property
    def traceparent(self) -> str:
        """This span as the ``traceparent`` of the work it calls (a webhook's receiver)."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """A new span in the same trace, below this one."""
        return replace(self, span_id=_new_span_id())

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
