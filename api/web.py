"""The web page: ``GET /`` (``index.html``) and its assets under ``/ui/``, shipped in ``api/static/``.

Static files only (HTML, CSS, plain JavaScript; no build step, nothing from another origin), so the page
works on a closed network. It calls the API on its own origin; the page itself holds no secret, so
``/`` and ``/ui/`` stay open when an API key is configured (the page asks for the key when the API
answers 401 and keeps it in the tab's ``sessionStorage``).
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from typing import Final

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from starlette.datastructures import MutableHeaders
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

router = APIRouter(tags=["web"])

#: Where the assets are mounted; the page refers to them by absolute path.
ASSETS_PATH: Final = "/ui"
#: The files of the page, inside the ``api`` package (``package-data`` in pyproject ships them).
STATIC: Final = ("api", "static")

#: The browser enforces what the page promises: scripts, styles, images, video and API calls from this
#: origin only (plus the object URLs the page makes for results, and for the clip it previews), no
#: plugins, not framed elsewhere.
CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' blob:",
        "media-src 'self' blob:",
        "connect-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
PAGE_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Revalidated on every load, so a new version of the service serves its own page.
    "Cache-Control": "no-cache",
}


#: The interactive docs' pages (Swagger UI, ReDoc, OAuth2 redirect), served offline from this origin.
DOCS_PAGES: Final = frozenset({"/docs", "/redoc", "/docs/oauth2-redirect"})
_INLINE_SCRIPT: Final = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: bytes) -> str:
    """The Content-Security-Policy of a docs page: everything from this origin only; its own inline
    scripts by their SHA-256 (so no other inline script runs); inline styles (Swagger UI and ReDoc
    set them as they draw); ReDoc's search runs in a worker made from a blob."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m.group(1)).digest()).decode()}'"
        for m in _INLINE_SCRIPT.finditer(html)
    )
    return "; ".join(
        (
            "default-src 'self'",
            f"script-src 'self' {hashes}".rstrip(),
            "style-src 'self' 'unsafe-inline'",
            "img-src 'self' data:",
            "worker-src 'self' blob:",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


class DocsPolicyMiddleware:
    """Adds :func:`docs_policy` to the docs pages (small HTML, read whole to hash its scripts)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in DOCS_PAGES:
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        body = bytearray()

        async def hold(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            if message["type"] != "http.response.body" or start is None:
                await send(message)
                return
            body.extend(message.get("body", b""))
            if message.get("more_body", False):
                return
            headers = MutableHeaders(scope=start)
            headers["Content-Security-Policy"] = docs_policy(bytes(body))
            headers["Referrer-Policy"] = "no-referrer"
            await send(start)
            await send({"type": "http.response.body", "body": bytes(body)})

        await self.app(scope, receive, hold)


def index_html() -> str:
    return files(STATIC[0]).joinpath(STATIC[1], "index.html").read_text(encoding="utf-8")


def assets() -> StaticFiles:
    """The page's assets (``app.js`` and the modules it imports, ``app.css``, ``icon.svg``), served from
    the installed package."""
    return StaticFiles(packages=[STATIC])


@router.get("/", include_in_schema=False)
@router.get(f"{ASSETS_PATH}/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(index_html(), headers=PAGE_HEADERS)
