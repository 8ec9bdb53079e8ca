"""One JSON error shape for every failure, and the one place domain exceptions become HTTP statuses.

Shape: ``{"error": {"code": "<machine-readable>", "message": "<for a person>"}}``.

:data:`CODES` lists every code the service can send, with its status and when it is sent; the
routes' OpenAPI responses, the README's error table and :data:`ERROR_CODES` (domain exception → code)
are all checked against it by the tests.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match
from starlette.types import Scope

from api.clients import queue_headers
from inference.align import AlignmentError
from inference.errors import (
    ConfigurationError,
    ConversionError,
    InputShapeError,
    OptionsError,
    StyleLoadingError,
    StyleUnavailableError,
    ToonserveError,
    UnknownStyleError,
    WeightsUnavailableError,
)
from inference.export import ExportError
from inference.faces import FaceDetectorError
from inference.models import StyleNotLoadedError
from inference.pipeline import AbandonedError, NoFaceError, PipelineError
from inference.quantize import QuantizationError
from inference.reference import ReferenceEngineError
from jobs.errors import (
    JobNotFoundError,
    JobsError,
    JobStoreError,
    ResultNotReadyError,
    StorageQuotaError,
    WebhookRefusedError,
)
from serving.encoding import EncodeOptionsError
from serving.images import CorruptImageError, ImageError, ImageTooLargeError, UnsupportedImageError
from serving.tickets import ClientQueueFullError, DeadlineExceededError, QueueFullError, SchedulerClosedError
from serving.video import CorruptVideoError, NotAVideoError, VideoEncodeError, VideoError, VideoTooLargeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Code:
    """An error code: its HTTP status and when it is sent."""

    status: int
    when: str


#: Every error code the service sends.
CODES: Final[dict[str, Code]] = {
    "corrupt_image": Code(400, "the image is truncated or damaged"),
    "corrupt_video": Code(400, "the video is truncated or damaged"),
    "malformed_multipart": Code(
        400, "the multipart body is broken (no boundary, cut short, a part without a name)"
    ),
    "http_error": Code(400, "the request could not be parsed otherwise"),
    "host_not_allowed": Code(400, "the Host header names none of TOONSERVE_ALLOWED_HOSTS"),
    "unauthorized": Code(401, "an API key is configured and the request has none or a wrong one"),
    "not_found": Code(404, "no such route"),
    "job_not_found": Code(404, "no such job (or item): never created, expired or deleted"),
    "method_not_allowed": Code(405, "the route does not take this method"),
    "request_timeout": Code(408, "the client stopped sending the body for TOONSERVE_BODY_TIMEOUT_S"),
    "result_not_ready": Code(409, "the item has no result: it is queued, running, failed or cancelled"),
    "payload_too_large": Code(413, "the request body is over TOONSERVE_MAX_UPLOAD_BYTES"),
    "too_many_parts": Code(413, "more than 1000 files or 1000 fields in one multipart body"),
    "field_too_large": Code(413, "a text field over 1 MiB"),
    "header_too_large": Code(413, "a part's header (its file name, usually) over 4224 bytes"),
    "image_too_large": Code(413, "the image is over TOONSERVE_MAX_PIXELS, or a decompression bomb"),
    "video_too_large": Code(
        413,
        "the video is longer than TOONSERVE_MAX_VIDEO_SECONDS, has more than TOONSERVE_MAX_VIDEO_FRAMES "
        "frames, frames over TOONSERVE_MAX_VIDEO_PIXELS, or (a video job's clip) over "
        "TOONSERVE_MAX_VIDEO_BYTES",
    ),
    "too_many_files": Code(
        413,
        "a batch of more than TOONSERVE_MAX_BATCH_FILES images, or of more than the client may send in "
        "a minute",
    ),
    "unsupported_image": Code(415, "not a JPEG, PNG, WebP, BMP, TIFF or GIF (decided by content)"),
    "unsupported_video": Code(
        415, "not an MP4, MOV, WebM, MKV, AVI or animated GIF video, or one without a video stream"
    ),
    "invalid_request": Code(422, "a field is missing, malformed or out of range"),
    "filename_too_long": Code(422, "an uploaded file's name over 255 characters"),
    "too_many_requests": Code(
        429,
        "this client has TOONSERVE_CLIENT_QUEUE_SIZE images waiting, sent its "
        "TOONSERVE_CLIENT_IMAGES_PER_MINUTE, or has TOONSERVE_CLIENT_EVENT_STREAMS job events streams "
        "open; Retry-After, RateLimit and RateLimit-Policy say more",
    ),
    "all_files_refused": Code(
        422, "a batch or job in which not one file could be taken (each one's reason is listed)"
    ),
    "unknown_style": Code(422, "no style of that name exists"),
    "style_not_loaded": Code(422, "the style exists but is not configured on this server"),
    "no_face": Code(422, "no face to stylise and no_face=error"),
    "alignment_failed": Code(422, "a face's landmarks admit no head crop"),
    "invalid_webhook": Code(422, "the webhook URL is not http(s), or points to a private address"),
    "client_closed_request": Code(499, "the client went away; its work was dropped"),
    "internal_error": Code(500, "a bug or a device fault; the server log has the details"),
    "configuration_error": Code(500, "a setting cannot work on this machine (device, dtype)"),
    "not_ready": Code(503, "the requested (or default) style is still loading"),
    "style_unavailable": Code(503, "the style's weights failed to load; retried in the background"),
    "queue_full": Code(503, "the queue is full; Retry-After says when to come back"),
    "event_streams_full": Code(
        503, "TOONSERVE_MAX_EVENT_STREAMS job events streams are open already; Retry-After"
    ),
    "shutting_down": Code(503, "the service is stopping and takes no new work"),
    "weights_unavailable": Code(503, "a style's weights are missing and cannot be downloaded"),
    "weights_invalid": Code(503, "a style's weight file is not a valid DCT-Net generator"),
    "detector_unavailable": Code(503, "the face detector could not be built"),
    "reference_engine_unavailable": Code(503, "ModelScope's reference pipeline cannot run here"),
    "job_store_unavailable": Code(503, "the job store (data directory, database or Redis) cannot be used"),
    "deadline_exceeded": Code(504, "no result within TOONSERVE_REQUEST_TIMEOUT_S; the work is dropped"),
    "insufficient_storage": Code(
        507, "the job would take the job storage over TOONSERVE_MAX_JOB_STORAGE_BYTES"
    ),
}

#: Domain exception → error code. Every ToonserveError subclass of ``inference`` has its own entry
#: (a test walks them); lookups go by the exception's class and its bases, most specific first.
ERROR_CODES: Final[dict[type[ToonserveError], str]] = {
    UnknownStyleError: "unknown_style",
    StyleNotLoadedError: "style_not_loaded",
    StyleLoadingError: "not_ready",
    StyleUnavailableError: "style_unavailable",
    NoFaceError: "no_face",
    OptionsError: "invalid_request",
    EncodeOptionsError: "invalid_request",
    AlignmentError: "alignment_failed",
    ImageError: "corrupt_image",
    VideoError: "corrupt_video",
    CorruptVideoError: "corrupt_video",
    NotAVideoError: "unsupported_video",
    VideoTooLargeError: "video_too_large",
    VideoEncodeError: "internal_error",
    # Only the CLI exports; a server whose engine needs an export and cannot make one is misconfigured.
    ExportError: "configuration_error",
    # int8 graphs that cannot be made on this server (a missing package, an old ONNX Runtime).
    QuantizationError: "configuration_error",
    UnsupportedImageError: "unsupported_image",
    ImageTooLargeError: "image_too_large",
    CorruptImageError: "corrupt_image",
    QueueFullError: "queue_full",
    ClientQueueFullError: "too_many_requests",
    DeadlineExceededError: "deadline_exceeded",
    SchedulerClosedError: "shutting_down",
    # The client is gone; nobody reads this, but the access log should say what happened.
    AbandonedError: "client_closed_request",
    WeightsUnavailableError: "weights_unavailable",
    ConversionError: "weights_invalid",
    FaceDetectorError: "detector_unavailable",
    ReferenceEngineError: "reference_engine_unavailable",
    ConfigurationError: "configuration_error",
    PipelineError: "internal_error",
    # A tensor of the wrong shape reaching a network is a bug, not bad input.
    InputShapeError: "internal_error",
    JobsError: "internal_error",
    JobNotFoundError: "job_not_found",
    ResultNotReadyError: "result_not_ready",
    StorageQuotaError: "insufficient_storage",
    WebhookRefusedError: "invalid_webhook",
    JobStoreError: "job_store_unavailable",
}


class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable error code (see the README's error table)")
    message: str = Field(description="what went wrong and, where possible, what to do, for a person")


class ErrorBody(BaseModel):
    """The shape of every error response."""

    error: ErrorDetail


class APIError(Exception):
    """An error raised by the HTTP layer itself (not a domain error). ``code`` must be in CODES."""

    def __init__(self, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = CODES[code].status
        self.code = code
        self.message = message
        self.headers = headers


def all_refused(reasons: list[tuple[str, str]]) -> APIError:
    """The error for a batch or job none of whose files could be taken: ``(filename, message)`` each."""
    listed = "; ".join(f"{name[:60]}: {message}" for name, message in reasons[:5])
    more = f"; and {len(reasons) - 5} more" if len(reasons) > 5 else ""
    return APIError("all_files_refused", f"none of the {len(reasons)} files could be taken: {listed}{more}")


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=CODES[code].status, headers=headers)


def code_for(exc: ToonserveError) -> str:
    """The error code of a domain exception (its own class's entry, else its nearest base's)."""
    for cls in type(exc).__mro__:
        code = ERROR_CODES.get(cls)
        if code is not None:
            return code
    return "internal_error"


def status_for(exc: ToonserveError) -> tuple[int, str]:
    code = code_for(exc)
    return CODES[code].status, code


def retry_headers(exc: ToonserveError) -> dict[str, str] | None:
    """``Retry-After`` for errors that pass, plus the RateLimit fields of a client's full share."""
    if exc.retry_after is None:
        return None
    headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, ClientQueueFullError):
        headers.update(queue_headers(exc.limit, exc.retry_after))
    return headers


#: Longest uploaded file name accepted (a common file system limit).
MAX_FILENAME_LENGTH: Final = 255


def _allowed_methods(scope: Scope, routes: Sequence[BaseRoute]) -> list[str]:
    """Every method some route takes at this path (FastAPI's own 405 names only one route's)."""
    methods: set[str] = set()
    for route in routes:
        if route.matches(scope)[0] is not Match.NONE:  # PARTIAL: the path fits, the method does not
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


def _body_error_code(exc: StarletteHTTPException) -> str | None:
    """The specific code of a body Starlette could not parse, from its message and the error behind
    it (the multipart parser's), or None when it is not one of those."""
    if exc.status_code != 400:
        return None
    causes = [str(exc.detail)]
    cause: BaseException | None = exc.__cause__ or exc.__context__
    while cause is not None and len(causes) < 8:
        causes.append(str(cause))
        cause = cause.__cause__ or cause.__context__
    text = " ".join(causes).lower()
    if "too many files" in text or "too many fields" in text or "header count" in text:
        return "too_many_parts"
    if "exceeded maximum size" in text:
        return "field_too_large"
    if "maximum header size" in text:
        return "header_too_large"
    if "multipart" in text or "boundary" in text or "content-disposition" in text:
        return "malformed_multipart"
    return None


#: The routes' file fields, and the curl arguments that send them.
FILE_FIELDS: Final = {"image": "-F image=@me.jpg", "images": "-F images=@me.jpg -F images=@friends.jpg"}


def _upload_mistake(field: str, request: Request, body: object) -> str:
    """What was received instead of the file field ``field``, and how to send it (the commonest first
    mistakes: another field name, a raw body, a file name sent as text)."""
    url = str(request.url.replace(query=None))
    how = f"curl {FILE_FIELDS[field]} {url}"
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    what = "the photo in a file field" if field == "image" else "each photo in a file field"
    if kind != "multipart/form-data":
        size = request.headers.get("content-length")
        if size == "0" or (not size and not kind):
            sent = "no body"
        else:
            sent = f"a body of type {kind or 'unknown (no Content-Type)'}"
            sent += f" ({size} bytes)" if size else ""
        return (
            f"received {sent}, not a multipart form; send {what} named {field} "
            f"(multipart/form-data), e.g. {how}"
        )
    received = []
    items = body.multi_items() if isinstance(body, FormData) else []
    for name, value in items:
        if isinstance(value, str):
            received.append(f"{name} (text {value[:40]!r})")
        else:
            received.append(f"{name} (the file {value.filename!r})" if value.filename else f"{name} (a file)")
    texts = [value for name, value in items if name == field and isinstance(value, str)]
    if texts:
        return (
            f"{field} was sent as text ({texts[0][:40]!r}), not as a file; with curl, put @ before the "
            f"file name: {how}"
        )
    had = ", ".join(received) if received else "no fields"
    return f"no file field named {field}; the form had {had}. Send {what} named {field}: {how}"


def _log(status: int, code: str, message: str) -> None:
    # 503 and 504 say the service is busy or still loading, not broken: a warning. Other 5xx are errors.
    if status in (503, 504):
        log.warning("%s: %s", code, message)
    elif status >= 500:
        log.error("%s: %s", code, message)


def install(app: FastAPI, routes: Sequence[BaseRoute] = ()) -> None:
    """Register the handlers that give every error the one JSON shape. ``routes``: the app's routes,
    to answer a 405 with every method its path takes."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        _log(exc.status, exc.code, exc.message)
        return error_response(exc.code, exc.message, exc.headers)

    @app.exception_handler(ToonserveError)
    async def _domain_error(_: Request, exc: ToonserveError) -> JSONResponse:
        status, code = status_for(exc)
        _log(status, code, str(exc))
        return error_response(code, str(exc), retry_headers(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = [p for p in err.get("loc", ()) if p not in ("body", "query", "form")]
            if loc and loc[0] in FILE_FIELDS:
                parts.append(_upload_mistake(str(loc[0]), request, exc.body))
                continue
            where = ".".join(str(p) for p in loc)
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return error_response("invalid_request", "; ".join(dict.fromkeys(parts)) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        specific = _body_error_code(exc)
        code = specific or {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        status = CODES[code].status if code != "http_error" else exc.status_code
        message = str(exc.detail)
        if specific == "header_too_large":
            message = "a part's header is over 4224 bytes (most likely its file name)"
        headers = dict(getattr(exc, "headers", None) or {})
        if status == 405:
            headers["Allow"] = ", ".join(_allowed_methods(request.scope, routes))
        return JSONResponse(error_body(code, message), status_code=status, headers=headers or None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response("internal_error", "internal error; see the server log")
