"""``/jobs``: hand in a folder of photos, follow its progress, fetch the results; nothing accepted is lost.

``POST /jobs`` answers 202 only once the job's record and every photo are durably on disk; the runner
(:mod:`jobs.runner`) then puts each photo through the same request flow as ``/cartoonize``, after
interactive requests. A photo that is not an image (or too large) becomes a failed item at once; it
does not refuse the job.

A ``video`` part instead of ``images`` makes a *video job*: the clip is checked from its header first
(a file that is not a video, or one over the video limits, refuses the request with 415, 413 or 400
before anything is stored), its frames are counted (``total``, ``done``), and its result, at
``/jobs/{id}/result``, is the cartoon clip as an MP4.

A job belongs to the client that handed it in (its API key's name; ``anonymous`` without keys): it is
seen, listed, followed, downloaded and deleted only with that client's key. Any other client gets 404
``job_not_found``, exactly as for a job that does not exist, so it cannot even learn that the id is
taken. An ``Idempotency-Key`` is the client's own too: two clients using the same key get two jobs.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
import zipfile
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from pathlib import Path as FilePath
from typing import Annotated, Any, BinaryIO, Final

from fastapi import APIRouter, Depends, File, Form, Header, Path, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.types import Receive, Scope, Send

from api import etags
from api.clients import STREAMS_POLICY, Caller, queue_headers
from api.errors import APIError, ErrorDetail, all_refused, code_for
from api.forms import RequestParams, check_filenames
from api.middleware import get_caller, megabytes
from api.openapi import BODY_CODES, COMMON_CODES, HEADERS, responses
from api.state import JobsState, ServiceState, get_state
from jobs.errors import JobNotFoundError, ResultNotReadyError, WebhookRefusedError
from jobs.model import (
    JOB_STATUSES,
    VIDEO_MEDIA_TYPE,
    ItemStatus,
    Job,
    JobKind,
    JobStatus,
    public_item,
    public_job,
    zip_name,
)
from jobs.store import JobStore, Upload
from jobs.webhooks import MAX_URL_LENGTH, check_url
from serving.clips import chunk_spans
from serving.encoding import MEDIA_TYPES
from serving.flow import Flow
from serving.images import ImageError, ImageTooLargeError, probe
from serving.log_context import trace_var
from serving.options import ResolvedOptions
from serving.reservation import reserve, reserve_video
from serving.video import MAX_VIDEO_QUALITY, VideoInfo, VideoTooLargeError, probe_video

router = APIRouter(tags=["jobs"])

#: Seconds between keep-alive comments on an idle events stream (proxies close silent ones).
_HEARTBEAT_S: Final = 15.0
#: Retry-After of a refused events stream (a slot frees when a stream's client disconnects).
_STREAMS_RETRY_S: Final = 5
_CHUNK: Final = 1 << 20


def get_jobs(state: Annotated[ServiceState, Depends(get_state)]) -> JobsState:
    return state.jobs


def _caller(request: Request) -> Caller:
    return get_caller(request.scope)


CallerDep = Annotated[Caller, Depends(_caller)]


# -- schemas ---------------------------------------------------------------------------------------


class JobItemOut(BaseModel):
    index: int = Field(description="the photo's position in the upload, from 0")
    filename: str = Field(description="the uploaded file's name")
    status: ItemStatus = Field(description="queued, running, ok, error or cancelled")
    error: ErrorDetail | None = Field(description="why it failed (status error)")
    faces_stylized: int | None = Field(description="faces that went through the head network (status ok)")
    timings_ms: dict[str, float] | None = Field(description="milliseconds per stage (status ok)")
    result_url: str | None = Field(description="where its result is (status ok)")
    frames: int | None = Field(None, description="a video item's frames (null: a photo)")
    first_frame: int | None = Field(None, description="a video item's first frame in the clip, from 0")
    frames_done: int = Field(0, description="a video item's frames written so far")


class JobOut(BaseModel):
    id: str = Field(description="the job's id")
    kind: JobKind = Field(description="images (photos, one item each) or video (one clip)")
    status: JobStatus = Field(
        description="queued, running, succeeded (every item ended, each ok or error), failed (the job "
        "could not run; see error) or cancelled"
    )
    created_at: str = Field(description="when it was accepted, ISO 8601 UTC")
    updated_at: str = Field(description="when it last changed, ISO 8601 UTC")
    expires_at: str = Field(description="when it and its results will be deleted, ISO 8601 UTC")
    total: int = Field(description="photos in the job; a video job's frames")
    done: int = Field(
        description="items that have ended (ok, error or cancelled); a video job's frames written"
    )
    failed: int = Field(description="items that ended in error")
    error: str | None = Field(description="why the job failed (status failed)")
    options: ResolvedOptions = Field(description="the options every photo is processed with")
    webhook: str | None = Field(description="where the job object is POSTed when it ends")
    result_url: str = Field(
        description="the ZIP of every result plus results.json; a video job's cartoon clip (MP4)"
    )
    items: list[JobItemOut] | None = Field(None, description="every photo, in upload order (not in listings)")


class JobList(BaseModel):
    jobs: list[JobOut] = Field(description="the most recent jobs first")


def _out(job: Job, with_items: bool = True) -> dict[str, Any]:
    return public_job(job, with_items)


# -- submit ----------------------------------------------------------------------------------------


def _size(upload: UploadFile) -> int:
    """An uploaded file's bytes (the multipart parser spooled it to disk past 1 MB)."""
    if upload.size is not None:
        return upload.size
    upload.file.seek(0, 2)
    size = upload.file.tell()
    upload.file.seek(0)
    return size


def _check_and_reserve(upload: UploadFile, size: int, params: ResolvedOptions, flow: Flow) -> int:
    """The photo's header checked (:func:`probe`), then the bytes its result reserves; blocking."""
    info = probe(upload.file, max_pixels=flow.max_pixels)
    return reserve(upload.file, size, info, params, png_compression=flow.limits.png_compression)


async def _accept(upload: UploadFile, params: ResolvedOptions, flow: Flow, max_bytes: int) -> Upload:
    """Check one photo as it is handed in, from its header, and decide what its result reserves
    (:mod:`serving.reservation`); a refused one becomes a failed item, with the code and message
    ``/cartoonize`` would have given it (a photo over ``max_bytes``, the largest body ``/cartoonize``
    takes, included). The photo is read from the parser's spool file: only its header, and a small
    one whole for the sample; its bytes go to the job's staging files in chunks."""
    name = upload.filename or "image"
    size = _size(upload)
    try:
        if size > max_bytes:
            raise ImageTooLargeError(
                f"the file is {megabytes(size)}; a photo may be at most {megabytes(max_bytes)} "
                "(TOONSERVE_MAX_UPLOAD_BYTES)"
            )
        reserved = await asyncio.to_thread(_check_and_reserve, upload, size, params, flow)
    except ImageError as exc:
        return Upload(name, None, 0, {"code": code_for(exc), "message": str(exc)}, 0)
    return Upload(name, upload.file, size, None, reserved)


def _probe_clip(stream: BinaryIO, jobs: JobsState) -> VideoInfo:
    """The clip's header checked (:func:`serving.video.probe_video`, which reads files): the upload is
    copied to a temporary file first (the system's temporary directory); blocking."""
    assert jobs.runner.clips is not None
    try:
        with tempfile.NamedTemporaryFile(prefix="toonserve-probe-", suffix=".tmp") as copy:
            shutil.copyfileobj(stream, copy, _CHUNK)
            copy.flush()
            stream.seek(0)
            return probe_video(FilePath(copy.name), jobs.runner.clips.limits)
    except OSError as exc:  # the temporary directory full or failing: the server's, not the clip's
        raise APIError(
            "insufficient_storage", f"the clip cannot be looked at: no room for a copy of it ({exc.strerror})"
        ) from exc


async def _accept_video(upload: UploadFile, params: ResolvedOptions, jobs: JobsState) -> list[Upload]:
    """Check a video job's clip as it is handed in, from its header: a file that is not a video,
    damaged or over the limits (its bytes: TOONSERVE_MAX_VIDEO_BYTES; duration, frames, pixels)
    refuses the request (the job would be that one clip); else its chunks (:func:`chunk_spans`),
    each with its frames, its share of the clip's bytes and what its result reserves
    (:func:`serving.reservation.reserve_video`)."""
    if jobs.runner.clips is None:
        raise APIError("invalid_request", "this server does not take video jobs")
    size = _size(upload)
    if size > jobs.max_video_bytes:
        raise VideoTooLargeError(
            f"the file is {megabytes(size)}; a video may be at most {megabytes(jobs.max_video_bytes)} "
            "(TOONSERVE_MAX_VIDEO_BYTES)"
        )
    info = await asyncio.to_thread(_probe_clip, upload.file, jobs)
    name = upload.filename or "video"
    uploads = []
    # Chunks that replicas share; the first holds the clip's file, the others link to it.
    for index, (first, end) in enumerate(chunk_spans(info.frames, float(info.fps), jobs.video_chunk_s)):
        frames = end - first
        estimate = reserve_video(frames, info.display_size, params, MAX_VIDEO_QUALITY)
        share = size * end // info.frames - size * first // info.frames
        stream = upload.file if index == 0 else None
        same_as = None if index == 0 else 0
        uploads.append(Upload(name, stream, share, None, estimate, frames, first, same_as))
    return uploads


_SUBMIT_CODES: Final = (
    *COMMON_CODES,
    *BODY_CODES,
    "invalid_request",
    "invalid_webhook",
    "unknown_style",
    "style_not_loaded",
    "not_ready",
    "style_unavailable",
    "too_many_files",
    "all_files_refused",
    "insufficient_storage",
    "corrupt_video",
    "video_too_large",
    "unsupported_video",
)


@router.post(
    "/jobs",
    summary="Hand in several photos as one job (answered at once; the work runs in the background)",
    status_code=202,
    response_model=JobOut,
    responses={
        200: {"model": JobOut, "description": "the job already accepted with this Idempotency-Key"},
        202: {
            "description": "accepted: the job and its photos are stored durably",
            "headers": {"Location": {"description": "the job's URL", "schema": {"type": "string"}}},
        },
        **responses(*_SUBMIT_CODES),
    },
)
async def submit_job(
    state: Annotated[ServiceState, Depends(get_state)],
    jobs: Annotated[JobsState, Depends(get_jobs)],
    caller: CallerDep,
    params: RequestParams,
    images: Annotated[
        list[UploadFile] | None, File(description="the photos, one part each (or send one video)")
    ] = None,
    video: Annotated[
        UploadFile | None,
        File(
            description="one clip instead of photos (MP4, MOV, WebM, MKV, AVI or animated GIF; decided by "
            "content): a video job, whose result is the cartoon clip (H.264 MP4, the clip's frames, "
            "timing, size or output_size, rotation and audio; quality=100 is lossless)"
        ),
    ] = None,
    webhook: Annotated[
        str | None,
        Form(
            description="http(s) URL the job object is POSTed to when the job ends (signed)",
            pattern=r"^https?://[^\s/?#]+\S*$",
            max_length=MAX_URL_LENGTH,
        ),
    ] = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=200,
            description="the same key again (from the same client) returns the job it created, never a "
            "second one",
        ),
    ] = None,
) -> JSONResponse:
    store = jobs.store
    # Scoped to the client: another client's key never finds this client's job.
    scoped_key = None if idempotency_key is None else f"{caller.name}/{idempotency_key}"
    if scoped_key is not None:
        existing = await asyncio.to_thread(store.by_idempotency_key, scoped_key)
        if existing is not None:
            return _job_response(existing, 200)
    if bool(images) == (video is not None):
        raise APIError(
            "invalid_request",
            "send the photos as `images` parts, or one clip as a `video` part (a video job), not both"
            if images
            else "send the photos as `images` parts, or one clip as a `video` part (a video job)",
        )
    parts: list[UploadFile] = [video] if video is not None else (images or [])
    if len(parts) > jobs.max_files:
        raise APIError("too_many_files", f"{len(parts)} files; a job takes at most {jobs.max_files}")
    check_filenames(parts)
    if webhook is not None:
        if not jobs.webhook_secret:
            raise APIError(
                "invalid_webhook", "webhooks need TOONSERVE_WEBHOOK_SECRET set on the server, to sign them"
            )
        try:
            await asyncio.to_thread(check_url, webhook, jobs.webhook_allow_private)
        except WebhookRefusedError as exc:
            raise APIError("invalid_webhook", str(exc)) from None
    if video is not None:
        uploads = await _accept_video(video, params, jobs)
    else:
        uploads = [await _accept(u, params, state.flow, jobs.max_photo_bytes) for u in parts]
    if all(u.error is not None for u in uploads):
        raise all_refused([(u.filename, (u.error or {}).get("message", "")) for u in uploads])
    job, created = await asyncio.to_thread(
        store.create,
        uuid.uuid4().hex,
        params,
        uploads,
        webhook=webhook,
        idempotency_key=scoped_key,
        ttl_s=jobs.ttl_s,
        quota_bytes=jobs.quota_bytes,
        client=caller.name,
        # Without keys every caller is "anonymous": each address then has its own share.
        account=caller.client.key,
        account_quota_bytes=(
            caller.job_storage_bytes if caller.job_storage_bytes is not None else jobs.client_quota_bytes
        ),
        # Its items and its webhook go on in this request's trace.
        trace=trace_var.get(),
    )
    if created:
        jobs.runner.wake()
        jobs.runner.changed(job, job.id)  # a job whose photos were all refused has ended already
    return _job_response(job, 202 if created else 200)


def _job_response(job: Job, status: int) -> JSONResponse:
    return JSONResponse(_out(job), status_code=status, headers={"Location": f"/jobs/{job.id}"})


# -- read ------------------------------------------------------------------------------------------

JobId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$", description="the job's id")]


async def _job(jobs: JobsState, job_id: str, caller: Caller) -> Job:
    """The caller's job ``job_id``; the same 404 whether it does not exist or is another client's."""
    return _owned(await asyncio.to_thread(jobs.store.get, job_id), job_id, caller)


def _owned(job: Job | None, job_id: str, caller: Caller) -> Job:
    if job is None or job.client != caller.name:
        raise JobNotFoundError(f"no job {job_id}: never created, expired or deleted")
    return job


_READ_CODES: Final = (*COMMON_CODES, "invalid_request", "job_not_found")


@router.get(
    "/jobs/{job_id}",
    summary="A job and every item's status",
    response_model=JobOut,
    responses=responses(*_READ_CODES),
)
async def get_job(
    jobs: Annotated[JobsState, Depends(get_jobs)], caller: CallerDep, job_id: JobId
) -> JSONResponse:
    return JSONResponse(_out(await _job(jobs, job_id, caller)))


@router.get(
    "/jobs",
    summary="The most recent jobs (this client's)",
    response_model=JobList,
    responses=responses(*COMMON_CODES, "invalid_request"),
)
async def list_jobs(
    jobs: Annotated[JobsState, Depends(get_jobs)],
    caller: CallerDep,
    status: Annotated[
        JobStatus | None, Query(description=f"only jobs in this status: {', '.join(JOB_STATUSES)}")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100, description="at most this many")] = 20,
) -> JSONResponse:
    found = await asyncio.to_thread(jobs.store.recent, status, limit, caller.name)
    return JSONResponse({"jobs": [_out(job, with_items=False) for job in found]})


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _job_event(job: Job) -> bytes:
    return _sse("job", _out(job))


def _item_event(job: Job, index: int) -> bytes:
    return _sse("item", public_item(job, job.items[index]))


def _end_event(job: Job) -> bytes:
    return _sse("end", _out(job))


def _progress_event(job: Job) -> bytes:
    return _sse("progress", {"id": job.id, "status": job.status, "total": job.total, "done": job.done})


class _EventStream(StreamingResponse):
    """An events stream that gives its slot back (``release``) however it ends: the job ended, the
    client disconnected (the stream is cancelled, maybe before its first byte), an error."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _take_stream(jobs: JobsState, caller: Caller) -> Callable[[], None]:
    """A slot for one more events stream of the caller, and how to give it back: 429
    ``too_many_requests`` beyond the client's cap, 503 ``event_streams_full`` beyond the total."""
    slots = jobs.streams
    key = caller.client.key
    refused = slots.take(key, caller.event_streams)
    if refused == "client":
        limit = caller.event_streams if caller.event_streams is not None else slots.per_client
        retry = _STREAMS_RETRY_S
        raise APIError(
            "too_many_requests",
            f"this client has {limit} events streams open, as many as it may; close one (or follow the "
            f"job with GET /jobs/{{id}}) and retry in about {retry} s",
            headers={"Retry-After": str(retry), **queue_headers(limit, retry, STREAMS_POLICY)},
        )
    if refused == "total":
        raise APIError(
            "event_streams_full",
            f"this server has {slots.total} events streams open, as many as it holds; retry in about "
            f"{_STREAMS_RETRY_S} s, or poll GET /jobs/{{id}} meanwhile",
            headers={"Retry-After": str(_STREAMS_RETRY_S)},
        )
    released = False

    def release() -> None:
        nonlocal released
        if not released:
            released = True
            slots.give(key)

    return release


@router.get(
    "/jobs/{job_id}/events",
    summary="Server-Sent Events: the job now, each item as it ends, the job when it ends",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`job` (the job object, first, whenever you connect), `item` (one per item "
            "that ends from then on), `progress` (a video job's `{id, status, total, done}` in frames, "
            "whenever more are written: about twice a second), `end` (the job object once it has "
            "ended, or `{id, status: "
            '"deleted"}` if it was deleted; then the stream closes); a `: keep-alive` comment after '
            "15 s without an event. A client may hold TOONSERVE_CLIENT_EVENT_STREAMS streams open at "
            "once, the server TOONSERVE_MAX_EVENT_STREAMS",
        },
        **responses(*_READ_CODES, "too_many_requests", "event_streams_full"),
    },
)
async def job_events(
    jobs: Annotated[JobsState, Depends(get_jobs)], caller: CallerDep, job_id: JobId
) -> StreamingResponse:
    release = _take_stream(jobs, caller)
    # Listening before the first read: a change after that read reaches the listener.
    listener = jobs.hub.listen(job_id)

    def leave() -> None:
        listener.close()
        release()

    try:
        # The job's streams start from its watcher's last read: a thousand streams connecting to one
        # job read it once, not a thousand times.
        start = listener.known() or listener.seed(await asyncio.to_thread(jobs.store.get, job_id))
        first = _owned(start.job, job_id, caller)
    except BaseException:
        leave()
        raise

    async def stream() -> AsyncIterator[bytes]:
        job = first
        yield start.memo("job", partial(_job_event, job))
        sent = {item.index for item in job.items if item.ended}
        frames = job.done
        last = time.monotonic()
        # Until every item has ended: a cancelled job's running item still reports how it stopped.
        while not job.settled:
            snapshot = await listener.next(last + _HEARTBEAT_S - time.monotonic())
            if snapshot is None:
                yield b": keep-alive\n\n"
                last = time.monotonic()
                continue
            if snapshot.job is None:  # deleted meanwhile
                yield _sse("end", {"id": job_id, "status": "deleted"})
                return
            job = snapshot.job
            if job.kind == "video" and job.done != frames and not job.settled:
                frames = job.done
                yield snapshot.memo("progress", partial(_progress_event, job))
                last = time.monotonic()
            for index in sorted(snapshot.ended - sent):
                sent.add(index)
                # Made once for all the job's listeners (as is its end below).
                yield snapshot.memo(index, partial(_item_event, job, index))
                last = time.monotonic()
            if job.settled:
                yield snapshot.memo("end", partial(_end_event, job))
                return
        yield _end_event(job)

    return _EventStream(stream(), leave)


@router.get(
    "/jobs/{job_id}/items/{index}",
    summary="One item's result image (a video job's items are chunks of its clip: see its result)",
    response_class=FileResponse,
    responses={
        200: {
            "content": {t: {} for t in MEDIA_TYPES.values()},
            "description": "the result",
            "headers": {name: HEADERS[name] for name in ("ETag", "Cache-Control")},
        },
        304: {"description": "If-None-Match named its ETag: your copy is current; no body"},
        **responses(*_READ_CODES, "result_not_ready"),
    },
)
async def get_item(
    request: Request,
    jobs: Annotated[JobsState, Depends(get_jobs)],
    caller: CallerDep,
    job_id: JobId,
    index: Annotated[int, Path(ge=0, description="the photo's position in the upload, from 0")],
) -> Response:
    job = await _job(jobs, job_id, caller)
    if index >= len(job.items):
        raise JobNotFoundError(f"job {job_id} has {len(job.items)} items; there is no item {index}")
    item = job.items[index]
    if item.frames is not None:
        raise ResultNotReadyError(
            f"item {index} is frames {item.first_frame}–{item.first_frame + item.frames - 1} of a clip; "
            f"the video job's result is the whole clip, at /jobs/{job_id}/result"
        )
    if item.status != "ok":
        detail = f": {item.error['message']}" if item.error else ""
        raise ResultNotReadyError(f"item {index} has no result; it is {item.status}{detail}")
    path = jobs.store.result_path(job_id, index, job.suffix)
    return await _file_response(
        request,
        jobs,
        job,
        path,
        str(index),
        MEDIA_TYPES[job.options.format],
        zip_name(index, item.filename, job.suffix),
    )


async def _clip_file(request: Request, jobs: JobsState, job: Job) -> Response:
    """A video job's clip, joined from its chunks (here, if the runner that ended the job did not)."""
    if job.status == "failed":
        # Its chunks may read cancelled or in error: the job's own error says what went wrong.
        raise ResultNotReadyError(f"the job failed and has no clip: {job.error}")
    for item in job.items:
        if item.status != "ok":
            detail = f": {item.error['message']}" if item.error else ""
            last = item.first_frame + (item.frames or 1) - 1
            raise ResultNotReadyError(
                f"the clip has no result; frames {item.first_frame}–{last} are {item.status}{detail}"
            )
    try:
        path = await asyncio.to_thread(jobs.store.join_clip, job)
    except FileNotFoundError:
        raise JobNotFoundError(f"no job {job.id}: deleted meanwhile") from None
    name = zip_name(0, job.items[0].filename, job.suffix)
    return await _file_response(request, jobs, job, path, "clip", VIDEO_MEDIA_TYPE, name)


async def _file_response(
    request: Request, jobs: JobsState, job: Job, path: FilePath, what: str, media_type: str, name: str
) -> Response:
    """A result file with its ETag (304 on a match); ranges are served (a video player seeks)."""
    try:
        stat = await asyncio.to_thread(path.stat)
    except FileNotFoundError:
        raise JobNotFoundError(f"no job {job.id}: deleted meanwhile") from None
    # A result file is written once under its final name: the job, the item and the file as written
    # say which bytes these are.
    etag = etags.quoted(etags.file_tag(jobs.etag_salt, job.id, what, f"{stat.st_size}/{stat.st_mtime_ns}"))
    if etags.matches(request.headers.get("if-none-match"), etag):
        return etags.not_modified(etag)
    return FileResponse(
        path, media_type=media_type, filename=name, headers=etags.caching_headers(etag), stat_result=stat
    )


class _Sink:
    """A write-only stream that hands out what was written since last asked (for a streamed ZIP)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


def _zip_tag(store: JobStore, job: Job, salt: str) -> str:
    """The ZIP's tag: its bytes follow from the job's record and its result files as written (its
    entries are dated by the job, not by the download)."""
    files = []
    for item in job.items:
        if item.status == "ok":
            try:
                stat = store.result_path(job.id, item.index, job.suffix).stat()
                files.append(f"{item.index}:{stat.st_size}/{stat.st_mtime_ns}")
            except FileNotFoundError:
                files.append(f"{item.index}:gone")
    return etags.quoted(etags.file_tag(salt, job.id, json.dumps(_out(job), sort_keys=True), *files))


def _zip_stream(store: JobStore, job: Job) -> Iterator[bytes]:
    """The job's results and results.json as a ZIP, produced piece by piece (never all in memory);
    the same job gives the same bytes (:func:`_zip_tag`)."""
    sink = _Sink()
    report = []
    stamp = time.gmtime(job.created_at)[:6]
    # Stored, not deflated: the images are compressed already.
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as zf:
        for item in job.items:
            entry = public_item(job, item)
            if item.status == "ok":
                name = zip_name(item.index, item.filename, job.suffix)
                path = store.result_path(job.id, item.index, job.suffix)
                try:
                    with path.open("rb") as src, zf.open(zipfile.ZipInfo(name, stamp), "w") as dst:
                        while chunk := src.read(_CHUNK):
                            dst.write(chunk)
                            yield sink.take()
                    entry["file"] = name
                except FileNotFoundError:  # deleted meanwhile (expiry, DELETE)
                    entry["file"] = None
            report.append(entry)
        summary = _out(job, with_items=False)
        zf.writestr(
            zipfile.ZipInfo("results.json", stamp), json.dumps({"job": summary, "items": report}, indent=2)
        )
    yield sink.take()


@router.get(
    "/jobs/{job_id}/result",
    summary="Every result so far as a ZIP, with results.json (streamed); a video job's cartoon clip",
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {"application/zip": {}, VIDEO_MEDIA_TYPE: {}},
            "description": "the ZIP; for a video job the clip (H.264 MP4; Range requests served)",
            "headers": {name: HEADERS[name] for name in ("ETag", "Cache-Control")},
        },
        304: {"description": "If-None-Match named its ETag: nothing changed since your copy; no body"},
        **responses(*_READ_CODES, "result_not_ready"),
    },
)
async def get_result(
    request: Request, jobs: Annotated[JobsState, Depends(get_jobs)], caller: CallerDep, job_id: JobId
) -> Response:
    job = await _job(jobs, job_id, caller)
    if job.kind == "video":
        return await _clip_file(request, jobs, job)
    etag = await asyncio.to_thread(_zip_tag, jobs.store, job, jobs.etag_salt)
    if etags.matches(request.headers.get("if-none-match"), etag):
        return etags.not_modified(etag)
    headers = {
        "Content-Disposition": f'attachment; filename="toonserve-{job_id}.zip"',
        **etags.caching_headers(etag),
    }
    return StreamingResponse(_zip_stream(jobs.store, job), media_type="application/zip", headers=headers)


@router.delete(
    "/jobs/{job_id}",
    summary="Cancel a job (what has not run), or delete an ended one with its files",
    response_model=JobOut,
    responses={
        200: {"description": "cancelled: the job object; a running item stops between stages"},
        204: {"description": "deleted, with its files"},
        **responses(*_READ_CODES),
    },
)
async def delete_job(
    jobs: Annotated[JobsState, Depends(get_jobs)], caller: CallerDep, job_id: JobId
) -> Response:
    job = await _job(jobs, job_id, caller)
    if job.terminal:
        await asyncio.to_thread(jobs.store.delete, job_id)
        jobs.hub.notify(job_id)
        return Response(status_code=204)
    cancelled = await asyncio.to_thread(jobs.store.cancel, job_id, jobs.ttl_s)
    jobs.runner.cancel_running(job_id)
    if cancelled is not None and cancelled.kind == "video" and cancelled.settled:
        # No chunk running to let the clip go when it stops: it goes now.
        await asyncio.to_thread(jobs.store.drop_clip, cancelled)
    jobs.runner.changed(cancelled, job_id)
    if cancelled is None:
        raise JobNotFoundError(f"no job {job_id}: deleted meanwhile")
    return JSONResponse(_out(cancelled))
