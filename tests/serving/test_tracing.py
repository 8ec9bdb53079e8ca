"""W3C Trace Context: what a caller's traceparent and tracestate become."""

from __future__ import annotations

import pytest

from serving import tracing
from serving.tracing import TraceContext

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_callers_span_is_read_and_the_request_is_its_child() -> None:
    caller = tracing.parse(PARENT, "congo=t61rcWkgMzE")
    assert caller == TraceContext(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01", "congo=t61rcWkgMzE"
    )
    mine = tracing.for_request(PARENT, "congo=t61rcWkgMzE")
    assert mine.trace_id == caller.trace_id and mine.span_id != caller.span_id and len(mine.span_id) == 16
    assert mine.flags == "01" and mine.state == "congo=t61rcWkgMzE"
    assert mine.headers() == {
        "traceparent": f"00-{mine.trace_id}-{mine.span_id}-01",
        "tracestate": "congo=t61rcWkgMzE",
    }
    unsampled = tracing.for_request(PARENT[:-2] + "00")
    assert unsampled.flags == "00" and unsampled.headers() == {"traceparent": unsampled.traceparent}


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00F067AA0BA902B7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has four fields
        "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # a digit short
    ],
)
def test_a_header_that_does_not_read_starts_a_trace_of_its_own(header: str) -> None:
    assert tracing.parse(header, "congo=t61rcWkgMzE") is None
    mine = tracing.for_request(header, "congo=t61rcWkgMzE")
    assert mine.trace_id not in header and mine.state == ""  # the state of an unread parent is dropped
    assert len(mine.trace_id) == 32 and len(mine.span_id) == 16


def test_a_later_version_is_read_for_its_first_fields() -> None:
    later = tracing.parse("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-later")
    assert later is not None and later.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert later.traceparent.startswith("00-")  # passed on in the version this service speaks


def test_an_odd_tracestate_is_dropped_not_cut() -> None:
    assert tracing.parse(PARENT, "a=" + "x" * 600).state == ""  # type: ignore[union-attr]
    assert tracing.parse(PARENT, "a=b\r\nX-Evil: 1").state == ""  # type: ignore[union-attr]
    assert tracing.parse(PARENT, " a=b,c=d ").state == "a=b,c=d"  # type: ignore[union-attr]


def test_new_traces_and_spans_are_new() -> None:
    traces = {tracing.new_trace().trace_id for _ in range(100)}
    assert len(traces) == 100
    root = tracing.new_trace()
    assert len({root.child().span_id for _ in range(100)} | {root.span_id}) == 101
