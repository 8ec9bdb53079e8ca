"""``POST /cartoonize`` and ``POST /cartoonize/batch``: photos in, cartoons out.

The routes parse the form and shape the response; the work is the one request flow
(:meth:`serving.flow.Flow.run` for one photo, :meth:`~serving.flow.Flow.run_many` for a batch). A
client that disconnects has its work cancelled: queued images are dropped, running ones stop between
stages.

A photo this client sent before (with the same style and processing size) is answered from what the
models made of it then (``X-Cache: hit``; :mod:`serving.result_cache`); an image answer carries a
strong ``ETag``, and a request whose ``If-None-Match`` names it gets 304 before anything runs
(:mod:`api.etags`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import zipfile
from collections.abc import Awaitable, Sequence
from typing import Annotated, Any, ClassVar, Final, Literal, TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api import etags
from api.clients import Caller
from api.errors import APIError, all_refused, status_for
from api.forms import RequestParams, check_filenames
from api.middleware import get_caller
from api.openapi import BODY_CODES, COMMON_CODES, HEADERS, SOURCE_DESCRIPTION, responses
from api.state import ServiceState, get_state
from inference.constants import SKIP_REASONS, NoFacePolicy
from inference.errors import ToonserveError
from inference.pipeline import AbandonedError
from inference.weights import WeightsKind
from jobs.model import zip_name
from serving.encoding import OUTPUTS, OutputFormat
from serving.flow import TIMINGS, Outcome

router = APIRouter(tags=["cartoonize"])

ResponseMode = Literal["image", "json"]
_DISCONNECT_POLL_S: Final = 0.1
_T = TypeVar("_T")


class Size(BaseModel):
    width: int = Field(description="pixels")
    height: int = Field(description="pixels")


class FaceOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in input-image pixels")
    score: float = Field(description="the detector's face probability, 0..1")
    landmarks: list[list[float]] = Field(
        description="x, y of the eyes (image-left first), the nose tip and the mouth corners"
    )
    stylized: bool = Field(description="whether this face went through the head network")
    reason: str | None = Field(
        None, description=f"why it was skipped: {', '.join(SKIP_REASONS)}; null when stylised"
    )


_FACE_EXAMPLE: dict[str, Any] = {
    "box": [201.3, 77.9, 262.5, 160.1],
    "score": 0.99987,
    "landmarks": [[216.2, 110.9], [244.8, 110.3], [230.9, 127.0], [219.5, 143.2], [243.1, 142.7]],
    "stylized": True,
    "reason": None,
}


class CartoonJSON(BaseModel):
    model_config: ClassVar[ConfigDict] = {
        "json_schema_extra": {
            "examples": [
                {
                    "image": "iVBORw0KGgo...",
                    "media_type": "image/png",
                    "format": "png",
                    "style": "anime",
                    "faces": [_FACE_EXAMPLE],
                    "faces_stylized": 1,
                    "input_size": {"width": 512, "height": 512},
                    "processing_size": {"width": 512, "height": 512},
                    "output_size": {"width": 512, "height": 512},
                    "device": "cpu",
                    "dtype": "bfloat16",
                    "dtype_reason": "auto: this CPU computes bfloat16 in hardware (AMX or AVX512-BF16); …",
                    "no_face": None,
                    "source": "modelscope",
                    "cache": "miss",
                    "timings_ms": {
                        "decode": 3.1,
                        "queue": 0.4,
                        "resize": 0.1,
                        "background": 98.7,
                        "detect": 18.9,
                        "align": 1.6,
                        "head": 18.2,
                        "blend": 1.4,
                        "strength": 0.5,
                        "resize_out": 0.7,
                        "encode": 41.2,
                    },
                }
            ]
        }
    }

    image: str = Field(
        description="the encoded image, base64 (not in a batch ZIP's results.json: the image is a file there)"
    )
    media_type: str = Field(description="the image's media type, e.g. image/png")
    format: OutputFormat = Field(description="the image's format")
    style: str = Field(description="the style it was drawn in")
    faces: list[FaceOut] = Field(description="every face found, stylised or skipped, largest first")
    faces_stylized: int = Field(description="how many faces went through the head network")
    input_size: Size = Field(description="the photo's size, upright (EXIF orientation applied)")
    processing_size: Size = Field(description="the size the models ran at")
    output_size: Size = Field(description="the result's size")
    device: str = Field(description="where the models ran, e.g. cpu or cuda:0")
    dtype: str = Field(description="the generators' precision")
    dtype_reason: str = Field(description="why that precision (TOONSERVE_DTYPE=auto picks per device)")
    no_face: NoFacePolicy | None = Field(
        None, description="set when no face was stylised: which policy produced the image"
    )
    source: WeightsKind = Field(description=SOURCE_DESCRIPTION)
    cache: Literal["hit", "miss"] = Field(
        description="hit: made from what the models made of this photo for this client before (only "
        "strength, resize and encode ran); miss: the models ran"
    )
    timings_ms: dict[str, float] = Field(description=f"milliseconds per stage: {', '.join(TIMINGS)}")


class BatchItem(BaseModel):
    filename: str = Field(description="the uploaded file's name")
    status: Literal["ok", "error"] = Field(
        description="ok: cartoonized (see `result`); error: not (`error` says why); as a job's items say"
    )
    http_status: int = Field(description="the HTTP status this image alone would have had (200 when ok)")
    error: dict[str, str] | None = Field(None, description="code and message when status is not 200")
    result: CartoonJSON | None = Field(None, description="the report when status is 200")
    file: str | None = Field(None, description="its file in the ZIP (response=image)")


class BatchJSON(BaseModel):
    results: list[BatchItem] = Field(description="one entry per uploaded file, in upload order")


ResponseField = Annotated[
    ResponseMode, Form(description="image: the encoded bytes; json: base64 plus the report")
]


async def _until_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """``work``, cancelled if the client disconnects first (its images are then dropped)."""
    task = asyncio.ensure_future(work)
    gone = False

    async def watch() -> None:
        nonlocal gone
        while not task.done():
            if await request.is_disconnected():
                gone = True
                task.cancel()
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        return await task
    except asyncio.CancelledError:
        if gone:
            raise AbandonedError("the client went away; its work was dropped") from None
        raise
    finally:
        watcher.cancel()


async def _single_upload(request: Request, name: str) -> None:
    form = await request.form()  # already parsed for the parameters: this reads the cache
    if len(form.getlist(name)) > 1:
        raise APIError("invalid_request", f"{name}: send exactly one file (got {len(form.getlist(name))})")


def _take_rate(state: ServiceState, caller: Caller, images: int) -> dict[str, str]:
    """Count ``images`` against the caller's images per minute, if it has a rate: the RateLimit
    headers to answer with; 429 ``too_many_requests`` when they do not fit now, 413 when they never
    will (more at once than a minute's allowance)."""
    rate = caller.images_per_minute
    if rate is None:
        return {}
    if images > rate:
        raise APIError(
            "too_many_files",
            f"{images} images at once is more than this client may send in a minute ({rate}); "
            f"send at most {rate} per request",
        )
    taken = state.rates.take(caller.client.key, images, rate)
    if not taken.allowed:
        what = f"{images} more images" if images > 1 else "another image"
        raise APIError(
            "too_many_requests",
            f"this client may send {rate} images a minute and has {taken.remaining} left now; {what} "
            f"would exceed that. Retry in about {taken.retry_after} s",
            headers=taken.headers(),
        )
    return taken.headers()


def _size(hw: tuple[int, int]) -> Size:
    return Size(width=hw[1], height=hw[0])


def _server_timing(timings: dict[str, float], cache: str | None = None) -> str:
    parts = [f"{name};dur={ms:.2f}" for name, ms in timings.items()]
    if cache is not None:
        parts.append(f'cache;desc="{cache}"')
    return ", ".join(parts)


def _json(outcome: Outcome, dtype_reason: str, with_image: bool = True) -> CartoonJSON:
    result = outcome.result
    return CartoonJSON(
        image=base64.b64encode(outcome.data).decode("ascii") if with_image else "",
        media_type=outcome.params.media_type,
        format=outcome.params.format,
        style=result.style,
        faces=[
            FaceOut(
                box=[round(v, 2) for v in f.box],
                score=round(f.score, 5),
                landmarks=[[round(x, 2), round(y, 2)] for x, y in f.landmarks],
                stylized=f.stylized,
                reason=f.reason,
            )
            for f in result.faces
        ],
        faces_stylized=result.faces_stylized,
        input_size=_size(result.input_size),
        processing_size=_size(result.processing_size),
        output_size=_size(result.output_size),
        device=result.device,
        dtype=result.dtype,
        dtype_reason=dtype_reason,
        no_face=result.no_face,
        source=result.weights,
        cache=outcome.cache,
        timings_ms=outcome.timings_ms,
    )


_ROUTE_CODES: Final = (
    *COMMON_CODES,
    *BODY_CODES,
    "corrupt_image",
    "image_too_large",
    "unsupported_image",
    "invalid_request",
    "unknown_style",
    "style_not_loaded",
    "client_closed_request",
    "not_ready",
    "style_unavailable",
    "queue_full",
    "too_many_requests",
    "shutting_down",
    "deadline_exceeded",
)


@router.post(
    "/cartoonize",
    summary="Cartoonize one photo",
    response_model=CartoonJSON,
    responses={
        200: {
            "content": {spec.media_type: {} for spec in OUTPUTS.values()},
            "description": "the cartoon (response=image), or the JSON report with the image in base64",
            "headers": {
                name: HEADERS[name]
                for name in ("Server-Timing", "X-Faces-Stylized", "X-Cache", "ETag", "Cache-Control")
            },
        },
        304: {
            "description": "If-None-Match named this request's ETag (response=image): your copy is "
            "current; no body, nothing ran",
            "headers": {name: HEADERS[name] for name in ("ETag", "Cache-Control")},
        },
        **responses(*_ROUTE_CODES, "no_face"),
    },
)
async def cartoonize(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    image: Annotated[UploadFile, File(description="the photo")],
    params: RequestParams,
    response: ResponseField = "image",
) -> Response:
    await _single_upload(request, "image")
    check_filenames([image])
    caller = get_caller(request.scope)
    rate_headers = _take_rate(state, caller, 1)
    data = await image.read()
    flow = state.flow
    digest = etag = None
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and response == "image":
        digest = await flow.digest(data, caller.client)
        etag = etags.quoted(flow.tag(params, digest, "image"))
        if etags.matches(if_none_match, etag):
            return etags.not_modified(etag, rate_headers)
    outcome = await _until_disconnected(request, flow.run(data, params, client=caller.client, digest=digest))
    headers = {
        "Server-Timing": _server_timing(outcome.timings_ms, outcome.cache),
        "X-Cache": outcome.cache,
        **rate_headers,
    }
    if response == "json":
        body = _json(outcome, state.engine.store.precision_of(outcome.result.style).reason)
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    headers["X-Faces-Stylized"] = str(outcome.result.faces_stylized)
    etag = etag or etags.quoted(flow.tag(params, outcome.photo_sha256, "image"))
    headers.update(etags.caching_headers(etag))
    return Response(outcome.data, media_type=params.media_type, headers=headers)


def _zip_name(index: int, filename: str, fmt: OutputFormat) -> str:
    return zip_name(index, filename, OUTPUTS[fmt].suffix)


def _error_item(name: str, exc: Exception) -> BatchItem:
    if isinstance(exc, APIError):
        return BatchItem(
            filename=name,
            status="error",
            http_status=exc.status,
            error={"code": exc.code, "message": exc.message},
        )
    if isinstance(exc, ToonserveError):
        status, code = status_for(exc)
        return BatchItem(
            filename=name, status="error", http_status=status, error={"code": code, "message": str(exc)}
        )
    raise exc


@router.post(
    "/cartoonize/batch",
    summary="Cartoonize several photos in one request",
    response_model=BatchJSON,
    responses={
        200: {
            "content": {"application/zip": {}},
            "description": "a ZIP of the results plus results.json (response=image), or JSON; each file "
            "has its own status, so one bad file does not sink the others",
            "headers": {
                "Server-Timing": {
                    **HEADERS["Server-Timing"],
                    "description": "milliseconds per stage, summed over the batch's images",
                }
            },
        },
        **responses(*_ROUTE_CODES, "too_many_files", "all_files_refused"),
    },
)
async def cartoonize_batch(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    images: Annotated[list[UploadFile], File(description="the photos")],
    params: RequestParams,
    response: ResponseField = "image",
) -> Response:
    if len(images) > state.max_batch_files:
        raise APIError("too_many_files", f"{len(images)} files; the limit is {state.max_batch_files}")
    check_filenames(images)
    caller = get_caller(request.scope)
    rate_headers = _take_rate(state, caller, len(images))
    datas = [await upload.read() for upload in images]
    outcomes = await _until_disconnected(request, state.flow.run_many(datas, params, client=caller.client))
    items: list[BatchItem] = []
    files: list[tuple[str, bytes]] = []
    totals = dict.fromkeys(TIMINGS, 0.0)
    for i, (upload, outcome) in enumerate(zip(images, outcomes, strict=True)):
        name = upload.filename or f"image-{i + 1}"
        if isinstance(outcome, Exception):
            items.append(_error_item(name, outcome))
            continue
        for stage, ms in outcome.timings_ms.items():
            totals[stage] += ms
        # In the ZIP the image is a file of its own; its report carries no base64 copy.
        report = _json(
            outcome,
            state.engine.store.precision_of(outcome.result.style).reason,
            with_image=response == "json",
        )
        if response == "image":
            zip_name = _zip_name(i, name, params.format)
            files.append((zip_name, outcome.data))
            items.append(BatchItem(filename=name, status="ok", http_status=200, result=report, file=zip_name))
        else:
            items.append(BatchItem(filename=name, status="ok", http_status=200, result=report))
    if all(400 <= item.http_status < 500 for item in items):
        # Not one photo among them: say so as an error, not as a success with nothing in it.
        raise all_refused([(item.filename, (item.error or {}).get("message", "")) for item in items])
    body = BatchJSON(results=items)
    headers = {"Server-Timing": _server_timing(totals), **rate_headers}
    if response == "json":
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    zipped = await run_in_threadpool(_zip, files, body)
    headers["Content-Disposition"] = 'attachment; filename="cartoons.zip"'
    return Response(zipped, media_type="application/zip", headers=headers)


def _zip(files: Sequence[tuple[str, bytes]], manifest: BatchJSON) -> bytes:
    buf = io.BytesIO()
    # Images are already compressed; storing them avoids burning CPU for nothing.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files:
            zf.writestr(name, data)
        # Each image is a file of its own here: its report carries no copy of it.
        report = manifest.model_dump(mode="json", exclude={"results": {"__all__": {"result": {"image"}}}})
        zf.writestr("results.json", json.dumps(report, indent=2))
    return buf.getvalue()
