"""The web page: ``GET /`` (``index.html``) and its assets under ``/ui/``, shipped in ``api/static/``.

Static files only (HTML, CSS, plain JavaScript; no build step, nothing from another origin), so the page
works on a closed network. It calls the API on its own origin; the page itself holds no secret, so
``/`` and ``/ui/`` stay open when an API key is configured (the page asks for the key when the API
answers 401 and keeps it in the tab's ``sessionStorage``).
"""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from fastapi import APIRouter
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

router = APIRouter(tags=["web"])

#: Where the assets are mounted; the page refers to them by absolute path.
ASSETS_PATH: Final = "/ui"
#: The files of the page, inside the ``api`` package (``package-data`` in pyproject ships them).
STATIC: Final = ("api", "static")

#: The browser enforces what the page promises: scripts, styles, images and API calls from this origin
#: only (plus the object URLs the page makes for results), no plugins, not framed elsewhere.
CONTENT_SECURITY_POLICY: Final = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' blob:",
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


def index_html() -> str:
    return files(STATIC[0]).joinpath(STATIC[1], "index.html").read_text(encoding="utf-8")


def assets() -> StaticFiles:
    """The page's assets (``app.js`` and the modules it imports, ``app.css``, ``icon.svg``), served from
    the installed package."""
    return StaticFiles(packages=[STATIC])


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(index_html(), headers=PAGE_HEADERS)
