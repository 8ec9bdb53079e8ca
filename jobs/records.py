"""The one codec of job records: what both stores keep (SQLite rows, Redis hashes) to and from
:class:`~jobs.model.Job` and :class:`~jobs.model.Item`.

A record is a mapping of field names to plain values. Structured fields (an item's error and timings,
a job's options) may be stored as JSON text (SQLite columns, Redis hash fields) or already decoded
(the items of a Redis job, one JSON object each); empty text is None.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, Final

from jobs.model import Item, Job
from jobs.store import Upload
from serving import tracing
from serving.options import ResolvedOptions
from serving.tickets import ANONYMOUS

#: An item's fields, in the order the SQLite table and the Redis item objects keep them.
ITEM_FIELDS: Final = (
    "filename",
    "status",
    "error",
    "faces_stylized",
    "timings_ms",
    "input_bytes",
    "result_bytes",
    "estimate",
    "frames",
    "first_frame",
    "frames_done",
)


def _json(value: Any) -> Any:
    """A structured field as its value: decoded if it is JSON text, None if empty."""
    if isinstance(value, str | bytes):
        return json.loads(value) if value else None
    return value


def new_item(upload: Upload) -> dict[str, Any]:
    """The record of an item as it is accepted: queued, or ended in error if its photo was refused."""
    accepted = upload.error is None
    return {
        "filename": upload.filename,
        "status": "queued" if accepted else "error",
        "error": upload.error,
        "faces_stylized": None,
        "timings_ms": None,
        "input_bytes": upload.size if accepted else 0,
        "result_bytes": 0,
        "estimate": upload.estimate if accepted else 0,
        "frames": upload.frames,
        "first_frame": upload.first_frame,
        "frames_done": 0,
    }


def item_from(index: int, record: Mapping[str, Any]) -> Item:
    return Item(
        index=int(index),
        filename=record["filename"],
        status=record["status"],
        error=_json(record.get("error")),
        faces_stylized=record.get("faces_stylized"),
        timings_ms=_json(record.get("timings_ms")),
        input_bytes=int(record.get("input_bytes") or 0),
        result_bytes=int(record.get("result_bytes") or 0),
        estimate=int(record.get("estimate") or 0),
        frames=None if record.get("frames") is None else int(record["frames"]),
        first_frame=int(record.get("first_frame") or 0),
        frames_done=int(record.get("frames_done") or 0),
    )


def job_from(record: Mapping[str, Any], items: Iterable[Item]) -> Job:
    """A job from its record and its items (in index order)."""
    return Job(
        id=record["id"],
        status=record["status"],
        options=ResolvedOptions.load(_json(record["options"])),
        items=tuple(items),
        created_at=float(record["created_at"]),
        updated_at=float(record["updated_at"]),
        expires_at=float(record["expires_at"]),
        webhook=record.get("webhook") or None,
        webhook_state=record.get("webhook_state") or "none",
        idempotency_key=record.get("idempotency_key") or None,
        error=record.get("error") or None,
        client=record.get("client") or ANONYMOUS,
        trace=tracing.parse(record.get("traceparent"), record.get("tracestate")),
    )
