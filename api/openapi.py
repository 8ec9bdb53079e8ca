"""The OpenAPI side of the API: the headers it declares, the error responses of each route, and the
generated schema made exact (what FastAPI cannot know: this server's limits and styles, a flat
multipart form, optional rather than nullable form fields)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

from api.errors import CODES, ErrorBody

#: OpenAPI description of the headers the service sends.
HEADERS: Final[dict[str, dict[str, Any]]] = {
    "X-Request-ID": {
        "description": "the request's id: yours if you sent a sane one, else a new one; in every log line",
        "schema": {"type": "string"},
    },
    "Retry-After": {
        "description": "seconds after which trying again makes sense",
        "schema": {"type": "integer"},
    },
    "Server-Timing": {
        "description": "milliseconds per stage: decode, queue, resize, background, detect, align, head, "
        "blend, strength, resize_out, encode",
        "schema": {"type": "string"},
    },
    "X-Faces-Stylized": {"description": "how many faces were stylised", "schema": {"type": "integer"}},
    "X-Cache": {
        "description": "hit: made from what the models made of this photo for you before (only strength, "
        "resize and encode ran); miss: the models ran",
        "schema": {"type": "string", "enum": ["hit", "miss"]},
    },
    "ETag": {
        "description": "a strong tag of this image: send it in If-None-Match to get 304 while it holds",
        "schema": {"type": "string"},
    },
    "Cache-Control": {
        "description": "private, no-cache: yours alone, revalidate with the ETag",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": 'what is left of this client\'s allowance: "images";r=<images left>;t=<seconds '
        'until full> (with TOONSERVE_CLIENT_IMAGES_PER_MINUTE), "queue";r=0;t=<seconds> when its '
        'queue share is full, or "streams";r=0;t=<seconds> when it has all the job events streams it '
        "may (IETF draft-ietf-httpapi-ratelimit-headers)",
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'this client\'s allowance: "images";q=<images>;w=60 (a minute), "queue";q=<images '
        'waiting at once>, or "streams";q=<job events streams open at once>',
        "schema": {"type": "string"},
    },
    "X-Content-Type-Options": {
        "description": "always nosniff: the body is what Content-Type says",
        "schema": {"type": "string", "enum": ["nosniff"]},
    },
}


def responses(*codes: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for routes that can send these error codes: one entry per status, with
    the error schema, the codes and when each is sent, and Retry-After on 503."""
    by_status: dict[int, list[str]] = {}
    for code in codes:
        by_status.setdefault(CODES[code].status, []).append(code)
    out: dict[int | str, dict[str, Any]] = {}
    for status, names in sorted(by_status.items()):
        entry: dict[str, Any] = {
            "model": ErrorBody,
            "description": "; ".join(f"`{n}`: {CODES[n].when}" for n in names),
        }
        if status == 503:
            entry["headers"] = {"Retry-After": HEADERS["Retry-After"]}
        elif status == 429:
            entry["headers"] = {
                name: HEADERS[name] for name in ("Retry-After", "RateLimit", "RateLimit-Policy")
            }
        out[status] = entry
    return out


#: Codes any route may send, whatever it does.
COMMON_CODES: Final = ("unauthorized", "payload_too_large", "internal_error")
#: Codes a route that reads a multipart body may send besides.
BODY_CODES: Final = (
    "malformed_multipart",
    "http_error",
    "request_timeout",
    "too_many_parts",
    "field_too_large",
    "header_too_large",
    "filename_too_long",
)


#: What the ``source`` field of styles and results means.
SOURCE_DESCRIPTION: Final = (
    "the style's weights, once loaded: `modelscope` (a real DCT-Net model's files) or `demo` (random "
    "weights in the official architecture, from `toonserve demo-weights`: not real cartoons)"
)

#: A loaded style's generator backend, in /readyz and /styles (inference/backends.py).
BACKEND_DESCRIPTION: Final = (
    "the generator backend that runs the style, once loaded: `onednn`, `eager` or `onnxruntime` "
    "(TOONSERVE_BACKEND; with `auto`, measured when the style loaded)"
)
BACKEND_REASON_DESCRIPTION: Final = "why that backend: set by TOONSERVE_BACKEND, or what auto measured"
#: A loaded style's precision, in /readyz and /styles: the service's, or int8 where auto picked it for
#: that style's weights (docs/int8.md).
STYLE_DTYPE_DESCRIPTION: Final = (
    "the style's generator precision, once loaded: the service's (TOONSERVE_DTYPE), or int8 where "
    "auto measured that style's int8 graphs under one level from float32 on average, and faster"
)
STYLE_DTYPE_REASON_DESCRIPTION: Final = "why that precision for this style (what auto measured)"
#: The service's ``dtype`` field in /readyz and /styles.
SERVICE_DTYPE_DESCRIPTION: Final = (
    "the generators' precision: the default style's once it is loaded (each style's under `styles`)"
)
SERVICE_DTYPE_REASON_DESCRIPTION: Final = (
    "why that precision (TOONSERVE_DTYPE=auto picks per device, and per style for int8)"
)
BACKEND_TIMES_DESCRIPTION: Final = (
    "what decided it under TOONSERVE_BACKEND=auto: the median ms of one background-network pass on a "
    "288×288 image per candidate that met the precision's accuracy bound (empty when there was "
    "nothing to choose between)"
)
BACKEND_EXCLUDED_DESCRIPTION: Final = (
    "candidates auto left out, and why: not usable on this device or in this precision, not installed "
    "(with the extra to install), failed, or too far from the eager float32 output"
)

#: The ways a request sends its API key (either one), as OpenAPI security schemes.
SECURITY_SCHEMES: Final[dict[str, dict[str, Any]]] = {
    "ApiKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "one of the keys the server is configured with (TOONSERVE_API_KEY, _KEYS, _KEYS_FILE)",
    },
    "Bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "the same key as `Authorization: Bearer <key>`",
    },
}

#: Multipart request bodies' extension naming the largest body this server reads (then 413).
MAX_BODY_BYTES_KEY = "x-max-body-bytes"


def video_limits_extensions(
    max_bytes: int, max_seconds: float, max_frames: int, max_pixels: int
) -> dict[str, Any]:
    """What a video part says of the limits it is checked against (413 ``video_too_large`` beyond)."""
    return {
        "x-max-bytes": max_bytes,
        "x-max-seconds": max_seconds,
        "x-max-frames": max_frames,
        "x-max-pixels": max_pixels,
    }


def exact_schema(
    schema: dict[str, Any],
    *,
    styles: list[str],
    most_files: dict[str, int],
    most_bytes: dict[str, int],
    default_bytes: int,
    is_open: Callable[[str], bool] | None = None,
    part_limits: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None,
) -> dict[str, Any]:
    """FastAPI's generated ``schema``, made exact where it is not:

    * ``X-Request-ID`` and ``X-Content-Type-Options`` declared on every response (the middleware adds
      them to all);
    * the option fields (a form model) are listed flat with the files, as the form is;
    * optional multipart fields are optional, not nullable (a form part cannot be null: it is sent
      or left out), and a list of files holds at least one and at most this server's limit
      (``most_files`` by route);
    * ``style`` takes the styles this server is configured with (``styles``);
    * each multipart body says its byte limit in ``x-max-body-bytes`` (clients, the web page among
      them, can refuse a choice before sending it): ``most_bytes`` by route, else ``default_bytes``;
      and a part with limits of its own says them as extensions of its property (``part_limits``:
      route → part → ``{"x-max-…": value}``, e.g. a video job's clip);
    * with API keys configured (``is_open`` tells the routes that need none), the two ways of sending
      one as security schemes, required by every other route (Swagger's Authorize button).
    """
    if is_open is not None:
        schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for route, path in schema.get("paths", {}).items():
        for operation in path.values():
            if is_open is not None and not is_open(route):
                operation["security"] = [{name: []} for name in SECURITY_SCHEMES]
            for response in operation.get("responses", {}).values():
                headers = response.setdefault("headers", {})
                headers["X-Request-ID"] = HEADERS["X-Request-ID"]
                headers["X-Content-Type-Options"] = HEADERS["X-Content-Type-Options"]
            body = operation.get("requestBody", {}).get("content", {}).get("multipart/form-data")
            if body:
                _exact_form(schema, body["schema"], styles, most_files.get(route))
                body[MAX_BODY_BYTES_KEY] = most_bytes.get(route, default_bytes)
                _part_limits(schema, body["schema"], (part_limits or {}).get(route, {}))
    return schema


def _part_limits(
    schema: dict[str, Any], form: dict[str, Any], limits: Mapping[str, Mapping[str, Any]]
) -> None:
    ref = form.get("$ref", "")
    target = schema["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else form
    for part, extensions in limits.items():
        target.get("properties", {}).get(part, {}).update(extensions)


def _exact_form(schema: dict[str, Any], form: dict[str, Any], styles: list[str], most: int | None) -> None:
    ref = form.get("$ref", "")
    components = schema["components"]["schemas"]
    target = components[ref.rsplit("/", 1)[-1]] if ref else form
    # The option fields come from a form model (serving.options.RequestOptions), which FastAPI puts in
    # an allOf; a multipart form is flat: its fields are listed with the others.
    for part in target.pop("allOf", []):
        merged = components[part["$ref"].rsplit("/", 1)[-1]] if "$ref" in part else part
        target.setdefault("properties", {}).update(merged.get("properties", {}))
        required = [*target.get("required", []), *merged.get("required", [])]
        if required:
            target["required"] = required
    if "style" in target.get("properties", {}):
        target["properties"]["style"]["enum"] = list(styles)
    for prop in target.get("properties", {}).values():
        options = prop.get("anyOf")
        if options and {"type": "null"} in options:
            kept = [o for o in options if o != {"type": "null"}]
            del prop["anyOf"]
            if len(kept) == 1:
                prop.update(kept[0])
            else:
                prop["anyOf"] = kept
            if prop.get("default", 0) is None:
                del prop["default"]
        if prop.get("type") == "array":
            prop["minItems"] = max(1, prop.get("minItems", 1))
            if most is not None:
                prop["maxItems"] = most
