"""One JSON error shape for every failure, and the one place domain exceptions become HTTP statuses.

Shape: ``{"error": {"code": "<machine-readable>", "message": "<for a person>"}}``.
"""

from __future__ import annotations

import logging
from typing import Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inference.errors import (
    ConversionError,
    InputShapeError,
    ToonserveError,
    UnknownStyleError,
    WeightsUnavailableError,
)
from inference.images import CorruptImageError, EncodeOptionsError, ImageTooLargeError, UnsupportedImageError
from inference.models import StyleNotLoadedError
from inference.pipeline import CancelledError, NoFaceError, OptionsError
from inference.scheduler import DeadlineExceededError, QueueFullError, SchedulerClosedError

log = logging.getLogger(__name__)

#: Domain exception → (HTTP status, error code). Most specific classes first.
STATUS: Final[list[tuple[type[ToonserveError], int, str]]] = [
    (UnknownStyleError, 422, "unknown_style"),
    (StyleNotLoadedError, 422, "style_not_loaded"),
    (NoFaceError, 422, "no_face"),
    (OptionsError, 422, "invalid_request"),
    (UnsupportedImageError, 415, "unsupported_image"),
    (ImageTooLargeError, 413, "image_too_large"),
    (CorruptImageError, 400, "corrupt_image"),
    (EncodeOptionsError, 422, "invalid_request"),
    (QueueFullError, 503, "queue_full"),
    (DeadlineExceededError, 504, "deadline_exceeded"),
    (SchedulerClosedError, 503, "shutting_down"),
    # The client is gone; nobody reads this, but the access log should say what happened.
    (CancelledError, 499, "client_closed_request"),
    (WeightsUnavailableError, 503, "weights_unavailable"),
    (ConversionError, 503, "weights_invalid"),
    (InputShapeError, 422, "bad_input_shape"),
]


class APIError(Exception):
    """An error raised by the HTTP layer itself (not a domain error)."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_body(code: str, message: str) -> dict[str, dict[str, str]]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=headers)


def status_for(exc: ToonserveError) -> tuple[int, str]:
    for cls, status, code in STATUS:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal_error"


def install(app: FastAPI) -> None:
    """Register the handlers that give every error the one JSON shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ToonserveError)
    async def _domain_error(_: Request, exc: ToonserveError) -> JSONResponse:
        status, code = status_for(exc)
        if status >= 500:
            log.error("%s: %s", code, exc)
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFullError) else None
        return error_response(status, code, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "form"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return error_response(422, "invalid_request", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; see the server log")
