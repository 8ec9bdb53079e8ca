"""Cross-cutting request handling: request id, access log, metrics, API key, body size limit."""

from __future__ import annotations

import contextvars
import hmac
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Final

from fastapi import FastAPI, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_response
from api.metrics import Metrics

log = logging.getLogger("toonserve.access")

#: The current request's id, for log records (see service/logging).
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

#: Routes that stay open when an API key is configured (orchestrator probes and scrapers).
OPEN_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})
_SAFE_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``, decided from Content-Length or while streaming — the body
    is never read past the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        message = f"request body is larger than the limit of {self.max_bytes} bytes"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = False
                if too_big:
                    await error_response(413, "payload_too_large", message)(scope, receive, send)
                    return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg: Message) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await error_response(413, "payload_too_large", message)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return str(path) if path else "unmatched"


def install(app: FastAPI, metrics: Metrics, api_key: str | None) -> None:
    """Request id, API key check, metrics and one access-log line per request."""

    @app.middleware("http")
    async def _per_request(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        incoming = request.headers.get("x-request-id", "")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        request.state.request_id = rid
        start = time.perf_counter()
        metrics.in_flight.inc()
        status = 500
        try:
            if (
                api_key is not None
                and request.url.path not in OPEN_PATHS
                and not _authorized(request, api_key)
            ):
                response: Response = error_response(
                    401, "unauthorized", "missing or wrong API key (send X-API-Key or Authorization: Bearer)"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
            else:
                response = await call_next(request)
            status = response.status_code
            response.headers["X-Request-ID"] = rid
            return response
        except Exception:
            log.exception("unhandled error")
            response = error_response(500, "internal_error", "internal error; see the server log")
            response.headers["X-Request-ID"] = rid
            return response
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(request)
            metrics.in_flight.dec()
            metrics.requests.labels(route=route, status=str(status)).inc()
            metrics.latency.labels(route=route).observe(elapsed)
            log.info(
                "%s %s %d %.1fms",
                request.method,
                request.url.path,
                status,
                elapsed * 1000,
                extra={"method": request.method, "path": request.url.path, "status": status,
                       "duration_ms": round(elapsed * 1000, 2)},
            )  # fmt: skip
            request_id_var.reset(token)


def _authorized(request: Request, api_key: str) -> bool:
    given = request.headers.get("x-api-key")
    if given is None:
        auth = request.headers.get("authorization", "")
        scheme, _, value = auth.partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else None
    return given is not None and hmac.compare_digest(given.encode(), api_key.encode())
