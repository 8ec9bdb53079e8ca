"""What a job is: its options (:class:`~serving.options.ResolvedOptions`), its items, their statuses,
and the public JSON of both.

A job is a set of photos handed in at once with one set of options. Each photo is an item that
goes through the request flow on its own; the job ends when every item has ended. A *video job* is one
clip, cut into chunks of frames: each item is a chunk, which knows its frames (:attr:`Item.frames`
from :attr:`Item.first_frame`) and how many are written (:attr:`Item.frames_done`), so replicas can
share a long clip; the job then counts frames, not items, and its result is the whole cartoon clip,
an MP4 (:data:`VIDEO_SUFFIX`), joined from the chunks' once they are all done.

Job status: ``queued`` (no item started yet), ``running``, ``succeeded`` (every item ended; each has
its own ``ok`` or ``error``), ``failed`` (the job could not run at all, e.g. its style is not
configured on this server), ``cancelled``. Item status: ``queued``, ``running``, ``ok``, ``error``,
``cancelled``.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

from serving.options import ResolvedOptions
from serving.tickets import ANONYMOUS
from serving.tracing import TraceContext

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ItemStatus = Literal["queued", "running", "ok", "error", "cancelled"]
JOB_STATUSES: Final[tuple[JobStatus, ...]] = get_args(JobStatus)
ITEM_STATUSES: Final[tuple[ItemStatus, ...]] = get_args(ItemStatus)
#: A job in one of these has ended: nothing of it will run again.
TERMINAL: Final[frozenset[str]] = frozenset({"succeeded", "failed", "cancelled"})
#: An item in one of these has ended.
ENDED: Final[frozenset[str]] = frozenset({"ok", "error", "cancelled"})

WebhookState = Literal["none", "pending", "delivered", "failed"]
JobKind = Literal["images", "video"]

#: A video job's result: H.264 in MP4, whatever the job's image ``format`` option says.
VIDEO_SUFFIX: Final = "mp4"
VIDEO_MEDIA_TYPE: Final = "video/mp4"


def result_suffix(options: ResolvedOptions, frames: int | None) -> str:
    """The suffix of an item's result file: its image format's, or :data:`VIDEO_SUFFIX` for a clip
    (``frames`` not None)."""
    return VIDEO_SUFFIX if frames is not None else options.suffix


@dataclass(frozen=True)
class Item:
    """One photo of a job."""

    index: int
    filename: str
    status: ItemStatus = "queued"
    #: ``{"code", "message"}`` when the item ended in error.
    error: dict[str, str] | None = None
    faces_stylized: int | None = None
    timings_ms: dict[str, float] | None = None
    #: Bytes of its photo while kept (until the item ends), of its result once written.
    input_bytes: int = 0
    result_bytes: int = 0
    #: Storage reserved for its result until it is written (an upper bound).
    estimate: int = 0
    #: A chunk of a clip: its frames (None: a photo), the first one's place in the clip, and how many
    #: of them are written so far.
    frames: int | None = None
    first_frame: int = 0
    frames_done: int = 0

    @property
    def ended(self) -> bool:
        return self.status in ENDED


@dataclass(frozen=True)
class Job:
    """A job and its items, as stored."""

    id: str
    status: JobStatus
    #: The request's options with the server's defaults of the day filled in.
    options: ResolvedOptions
    items: tuple[Item, ...]
    created_at: float
    updated_at: float
    expires_at: float
    webhook: str | None = None
    webhook_state: WebhookState = "none"
    idempotency_key: str | None = None
    #: Why the job failed, when it did.
    error: str | None = None
    #: Who handed it in (an API key's name, or ``anonymous``): only that client sees it, and its
    #: items share the worker fairly with other clients' items.
    client: str = ANONYMOUS
    #: The span of the ``POST /jobs`` that made it: its items and its webhook are spans of that trace.
    trace: TraceContext | None = None

    @property
    def kind(self) -> JobKind:
        return "video" if any(i.frames is not None for i in self.items) else "images"

    @property
    def suffix(self) -> str:
        """Its results' file suffix (:func:`result_suffix`)."""
        return VIDEO_SUFFIX if self.kind == "video" else self.options.suffix

    @property
    def total(self) -> int:
        """Photos, or a video job's frames."""
        return sum(i.frames or 0 for i in self.items) if self.kind == "video" else len(self.items)

    @property
    def done(self) -> int:
        """Items that have ended (ok, error or cancelled), or a video job's frames written."""
        if self.kind == "video":
            return sum((i.frames or 0) if i.status == "ok" else i.frames_done for i in self.items)
        return sum(i.ended for i in self.items)

    @property
    def failed(self) -> int:
        """Items that ended in error."""
        return sum(i.status == "error" for i in self.items)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def settled(self) -> bool:
        """Ended, and no item still running: a job cancelled while an item runs is terminal at once
        but settles when that item stops (between stages) or finishes."""
        return self.terminal and all(item.ended for item in self.items)


def iso(t: float) -> str:
    """An epoch time as ISO 8601 UTC with milliseconds."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


def result_url(job_id: str, index: int) -> str:
    return f"/jobs/{job_id}/items/{index}"


def zip_name(index: int, filename: str, suffix: str) -> str:
    """The result's file name inside the job's ZIP: ``001-<stem>.<suffix>``."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", filename.rsplit("/", 1)[-1].rsplit(".", 1)[0])[:64] or "image"
    return f"{index + 1:03d}-{stem}.{suffix}"


def public_item(job: Job, item: Item) -> dict[str, Any]:
    return {
        "index": item.index,
        "filename": item.filename,
        "status": item.status,
        "error": item.error,
        "faces_stylized": item.faces_stylized,
        "timings_ms": item.timings_ms,
        # A chunk's result is part of the job's clip, not a result of its own.
        "result_url": result_url(job.id, item.index) if item.status == "ok" and item.frames is None else None,
        "frames": item.frames,
        "first_frame": item.first_frame if item.frames is not None else None,
        "frames_done": item.frames_done if item.status != "ok" else item.frames,
    }


def public_job(job: Job, with_items: bool = True) -> dict[str, Any]:
    """The job object of the API, the events stream and the webhook."""
    out: dict[str, Any] = {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "created_at": iso(job.created_at),
        "updated_at": iso(job.updated_at),
        "expires_at": iso(job.expires_at),
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "error": job.error,
        "options": job.options.model_dump(),
        "webhook": job.webhook,
        "result_url": f"/jobs/{job.id}/result",
    }
    if with_items:
        out["items"] = [public_item(job, item) for item in job.items]
    return out
