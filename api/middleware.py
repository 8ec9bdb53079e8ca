"""Cross-cutting request handling (plain ASGI): request id, caller (API key), access log, metrics, body
limit."""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections.abc import Sequence
from typing import Final

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.clients import Caller, Clients
from api.errors import error_response
from api.metrics import Metrics
from serving import tracing
from serving.log_context import client_var, request_id_var, trace_var

log = logging.getLogger("toonserve.access")


#: Routes that stay open when an API key is configured: orchestrator probes and scrapers, the API
#: documentation and the web page (a browser cannot add the key to a page load; neither the schema nor
#: the page holds a secret: the page asks for the key and sends it with its API calls).
OPEN_PATHS: Final = frozenset(
    {"/healthz", "/readyz", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"}
)
#: Path prefixes that stay open the same way (the documentation's and the page's scripts and styles).
OPEN_PREFIXES: Final = ("/static-offline-docs/", "/ui/")


def is_open(path: str) -> bool:
    """Whether ``path`` is answered without a key when keys are configured."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


_SAFE_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
#: Answered whatever the Host header: orchestrators probe and scrape a pod by its address.
ANY_HOST_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})


def host_allowed(host_header: str, allowed: Sequence[str]) -> bool:
    """Whether a ``Host`` header (port and case aside) is one of ``allowed``: exact names or
    addresses, ``*.example.com`` for any name under example.com, ``*`` for any. An empty list allows
    any host."""
    if not allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):  # [v6]:port
        host = host[: host.find("]") + 1]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    host = host.rstrip(".")
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern == "*" or host == pattern:
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
            return True
    return False


def megabytes(size: int) -> str:
    """A byte count as people read it: 0.5 MB, 27.3 MB, 210 MB (10⁶ bytes, as file managers count)."""
    mb = size / 1e6
    return f"{mb:.1f} MB" if mb < 100 else f"{mb:.0f} MB"


class BodyLimitMiddleware:
    """Guards the request body: 413 when it is over the limit, decided from Content-Length or while
    it streams in (chunked uploads included) — it is never read past the limit; 408 when the client
    stops sending it for ``idle_timeout_s``. ``max_bytes`` holds for every route but those in
    ``routes`` (``(method, path) → limit``, e.g. the larger one of ``POST /jobs``).

    When it answers mid-body, the app behind it is told the client left (``http.disconnect``), so
    it stops reading, and whatever it would still send is dropped.
    """

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        routes: dict[tuple[str, str], int] | None = None,
        idle_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.routes = routes or {}
        self.idle_timeout_s = idle_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.routes.get((scope["method"], scope["path"]), self.max_bytes)
        too_large = f"the upload is over this service's limit of {megabytes(limit)} per request"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    size = int(value)
                except ValueError:
                    size = 0
                if size > limit:
                    message = (
                        f"the upload is {megabytes(size)}; this service takes at most "
                        f"{megabytes(limit)} per request"
                    )
                    await error_response("payload_too_large", message)(scope, receive, send)
                    return
        seen = 0
        body_done = False
        started = False
        answered = False

        async def answer(code: str, message: str) -> Message:
            nonlocal answered
            if not started and not answered:
                answered = True
                await error_response(code, message)(scope, receive, send)
            return {"type": "http.disconnect"}

        async def guarded_receive() -> Message:
            nonlocal seen, body_done
            if answered:
                return {"type": "http.disconnect"}
            if body_done or self.idle_timeout_s is None:
                msg = await receive()
            else:
                try:
                    msg = await asyncio.wait_for(receive(), self.idle_timeout_s)
                except TimeoutError:
                    return await answer(
                        "request_timeout", f"no body bytes received for {self.idle_timeout_s:g} s"
                    )
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                body_done = not msg.get("more_body", False)
                if seen > limit:
                    return await answer("payload_too_large", too_large)
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if answered:
                return
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        await self.app(scope, guarded_receive, guarded_send)


def _route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The route template a request matched (for metrics), also when it was answered before routing
    (a 401, a 413): found by matching it against the app's routes."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return str(path)
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.FULL:
            return str(getattr(route, "path", "unmatched"))
    return "unmatched"


def get_caller(scope: Scope) -> Caller:
    """The request's caller, as :class:`RequestContextMiddleware` found it."""
    caller: Caller = scope["state"]["caller"]
    return caller


class RequestContextMiddleware:
    """Request id (kept from ``X-Request-ID`` when sane, else new), the caller (its API key, checked
    unless the route is open; :mod:`api.clients`), metrics and one access-log line per request, each
    labelled with the caller's name. Plain ASGI, so disconnects reach the endpoints unchanged."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        clients: Clients,
        routes: Sequence[BaseRoute] = (),
        allowed_hosts: Sequence[str] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.clients = clients
        #: Host header values answered (``TOONSERVE_ALLOWED_HOSTS``; empty: any).
        self.allowed_hosts = tuple(allowed_hosts)
        #: The app's routes, to label requests answered before routing (a 401) with their route.
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        incoming = headers.get("x-request-id", "")
        rid = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(rid)
        # The request's own span: below the caller's (W3C traceparent) when it sent one, else a new trace.
        trace = tracing.for_request(headers.get("traceparent"), headers.get("tracestate"))
        trace_token = trace_var.set(trace)
        start_ns = tracing.now_ns()
        caller = self.clients.caller(scope, headers)
        name = (caller or self.clients.anonymous()).name
        client_token = client_var.set(name)
        scope.setdefault("state", {})["request_id"] = rid
        scope["state"]["caller"] = caller or self.clients.anonymous()
        start = time.perf_counter()
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = MutableHeaders(scope=message)
                headers["X-Request-ID"] = rid
                # Every answer is what it says it is: browsers must not sniff another type.
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if not (
                scope["path"] in ANY_HOST_PATHS or host_allowed(headers.get("host", ""), self.allowed_hosts)
            ):
                host = headers.get("host", "")[:100]
                await error_response(
                    "host_not_allowed",
                    f"this service does not answer for the host {host!r}; it answers for "
                    f"{', '.join(self.allowed_hosts)}",
                )(scope, receive, send_with_id)
            elif caller is None and not is_open(scope["path"]):
                response = error_response(
                    "unauthorized", "missing or wrong API key (send X-API-Key or Authorization: Bearer)"
                )
                response.headers["WWW-Authenticate"] = "Bearer"
                await response(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error")
            if not started:
                await error_response("internal_error", "internal error; see the server log")(
                    scope, receive, send_with_id
                )
        finally:
            elapsed = time.perf_counter() - start
            route = _route_label(scope, self.routes)
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route=route, status=str(status), client=name).inc()
            self.metrics.latency.labels(route=route, client=name).observe(elapsed)
            method, path, ms = scope["method"], scope["path"], round(elapsed * 1000, 2)
            fields = {"method": method, "path": path, "status": status, "duration_ms": ms, "client": name}
            log.info("%s %s %d %.1fms", method, path, status, ms, extra=fields)
            if tracing.exporting():
                tracing.emit_own(
                    trace,
                    f"{method} {route}",
                    start_ns,
                    start_ns + round(elapsed * 1e9),
                    kind="server",
                    attributes={
                        "http.request.method": method,
                        "http.route": route,
                        "url.path": path,
                        "http.response.status_code": status,
                        "toonserve.client": name,
                        "toonserve.request_id": rid,
                    },
                    error=f"HTTP {status}" if status >= 500 else None,
                )
            client_var.reset(client_token)
            trace_var.reset(trace_token)
            request_id_var.reset(token)
