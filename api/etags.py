"""Entity tags and conditional requests: ``ETag`` on every image a route answers with, and ``304 Not
Modified`` (no body) when the request's ``If-None-Match`` names it.

A tag is strong: the same tag, the same bytes. For a cartoon it is derived from the photo's SHA-256,
every option, the style's weights, the device and dtype and the limits that shape a result
(:meth:`serving.flow.Flow.tag`), so a matching ``If-None-Match`` is answered before any model runs;
for a job's stored files, from the job, the item and the file as written. ``TOONSERVE_ETAG_SALT`` is
mixed into all of them: changing it invalidates every tag given out.

``POST /cartoonize`` answers a match with 304 too, although RFC 9110 has an origin answer 412 to a
failed ``If-None-Match`` on methods other than GET and HEAD: the POST is a pure computation on the
uploaded photo (it changes nothing on the server), and 304 is what a client that kept the image
needs to hear, as image proxies answer their GETs. ``If-None-Match: *`` is not a match here: there is
no stored representation for it to mean.
"""

from __future__ import annotations

from typing import Final

from fastapi.responses import Response

from serving.flow import opaque_tag

#: Results are the caller's alone (never in a shared cache); a browser revalidates them with the tag.
CACHE_CONTROL: Final = "private, no-cache"


def quoted(opaque: str) -> str:
    """An opaque tag as the ``ETag`` header's value (a strong entity tag)."""
    return f'"{opaque}"'


def file_tag(salt: str, *parts: str) -> str:
    """An opaque tag (32 hex digits) of a stored file's representation, from what identifies it."""
    return opaque_tag(salt, *parts)


def matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (a quoted tag), by the weak comparison
    RFC 9110 prescribes for it (a ``W/`` prefix is ignored)."""
    if not if_none_match:
        return False
    for candidate in if_none_match.split(","):
        candidate = candidate.strip()
        if candidate.startswith("W/"):
            candidate = candidate[2:]
        if candidate == etag:
            return True
    return False


def caching_headers(etag: str) -> dict[str, str]:
    """What every tagged answer carries."""
    return {"ETag": etag, "Cache-Control": CACHE_CONTROL}


def not_modified(etag: str, headers: dict[str, str] | None = None) -> Response:
    """304 with no body: the caller's copy is current."""
    return Response(status_code=304, headers={**caching_headers(etag), **(headers or {})})
