"""``POST /cartoonize`` and ``POST /cartoonize/batch``: photos in, cartoons out.

Decode and encode run in worker threads (never on the event loop); the model work goes through the
device's scheduler, whose bounded queue answers 503 + Retry-After when full. Each image has a
deadline (504 when it passes) and is dropped from the queue if its client disconnects.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.errors import APIError, status_for
from api.metrics import Metrics
from api.state import ServiceState, get_state
from inference.errors import ToonserveError
from inference.images import MEDIA_TYPES, DecodedImage, OutputFormat, decode, encode
from inference.pipeline import STAGES, NoFacePolicy, Options, Result
from inference.scheduler import QueueFullError, Scheduler, Ticket

router = APIRouter(tags=["cartoonize"])

ResponseMode = Literal["image", "json"]
_DISCONNECT_POLL_S = 0.1


class Size(BaseModel):
    width: int
    height: int


class FaceOut(BaseModel):
    box: list[float] = Field(description="x1, y1, x2, y2 in input-image pixels")
    score: float
    landmarks: list[list[float]] = Field(description="eyes (image-left first), nose, mouth corners; x, y")
    stylized: bool
    reason: str | None = Field(None, description="why it was skipped: below_threshold, too_small, over_limit")


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
                    "no_face": None,
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

    image: str = Field(description="the encoded image, base64")
    media_type: str
    format: OutputFormat
    style: str
    faces: list[FaceOut]
    faces_stylized: int
    input_size: Size
    processing_size: Size
    output_size: Size
    device: str
    dtype: str
    no_face: NoFacePolicy | None = Field(None, description="set when no face was stylised: what was returned")
    timings_ms: dict[str, float] = Field(description="per stage, plus decode, queue and encode")


class BatchItem(BaseModel):
    filename: str
    status: int = Field(description="HTTP status this image alone would have had")
    error: dict[str, str] | None = None
    result: CartoonJSON | None = None
    file: str | None = Field(None, description="its file in the ZIP (response=image)")


class BatchJSON(BaseModel):
    results: list[BatchItem]


@dataclass
class _Params:
    """A request's validated form fields, with the scheduler that will run it."""

    scheduler: Scheduler
    style: str
    options: Options
    long_side: int | None
    fmt: OutputFormat
    quality: int
    response: ResponseMode


def _size(hw: tuple[int, int]) -> Size:
    return Size(width=hw[1], height=hw[0])


def _output_hw(input_hw: tuple[int, int], long_side: int | None) -> tuple[int, int] | None:
    if long_side is None:
        return None
    h, w = input_hw
    scale = long_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


# Form fields shared by both endpoints (descriptions and bounds; defaults are on the parameters).
StyleField = Annotated[
    str | None,
    Form(
        description="anime, 3d, handdrawn, sketch, artstyle, design or illustration; default: configured",
        examples=["anime"],
    ),
]
StrengthField = Annotated[
    float,
    Form(ge=0.0, le=1.0, description="1 = the cartoon, 0 = the photo, between: a blend", examples=[0.8]),
]
ProcessingField = Annotated[
    int | None,
    Form(ge=64, le=2048, description="short side the photo is processed at (default 720)", examples=[1024]),
]
OutputSizeField = Annotated[
    int | None,
    Form(ge=16, le=8192, description="long side of the result (default: input's)", examples=[1024]),
]
FormatField = Annotated[
    OutputFormat | None, Form(alias="format", description="png, jpeg or webp", examples=["jpeg"])
]
QualityField = Annotated[int | None, Form(ge=1, le=100, description="JPEG/WebP quality", examples=[85])]
NoFaceField = Annotated[
    NoFacePolicy,
    Form(
        description="without a face: background (whole-photo cartoon), error (422) or passthrough (the photo)"
    ),
]
ResponseField = Annotated[
    ResponseMode, Form(description="image: the encoded bytes; json: base64 plus the report")
]


def _params(
    state: Annotated[ServiceState, Depends(get_state)],
    style: StyleField = None,
    strength: StrengthField = 1.0,
    processing_size: ProcessingField = None,
    output_size: OutputSizeField = None,
    fmt: FormatField = None,
    quality: QualityField = None,
    no_face: NoFaceField = "background",
    response: ResponseField = "image",
) -> _Params:
    """The form fields both endpoints share (a dependency: declared once, validated once)."""
    scheduler = _scheduler(state)
    d = state.defaults
    style = style or state.default_style
    state.store.get(style)  # unknown or not loaded: 422 before any work
    try:
        options = Options(
            processing_size=processing_size or d.processing_size,
            strength=strength,
            no_face=no_face,
            min_face_size=d.min_face_size,
            max_faces=d.max_faces,
        )
    except ToonserveError as exc:
        raise APIError(422, "invalid_request", str(exc)) from exc
    return _Params(
        scheduler, style, options, output_size, fmt or d.output_format, quality or d.quality, response
    )


def _scheduler(state: ServiceState) -> Scheduler:
    if not state.ready.is_set() or state.scheduler is None:
        raise APIError(503, "not_ready", state.not_ready_reason(), headers={"Retry-After": "5"})
    return state.scheduler


async def _read(upload: UploadFile, state: ServiceState) -> tuple[DecodedImage, float]:
    start = time.perf_counter()
    data = await upload.read()
    decoded = await run_in_threadpool(decode, data, max_pixels=state.limits.max_pixels)
    return decoded, (time.perf_counter() - start) * 1000


def _submit(scheduler: Scheduler, params: _Params, decoded: DecodedImage, timeout_s: float) -> Ticket:
    options = params.options
    out_hw = _output_hw(decoded.pixels.shape[:2], params.long_side)
    if out_hw is not None:
        options = replace(options, output_size=out_hw)
    return scheduler.submit(params.style, decoded.pixels, options, time.monotonic() + timeout_s)


async def _wait(request: Request, ticket: Ticket, timeout_s: float) -> Result:
    """The ticket's result; 504 at its deadline; drops the work if the client disconnects."""
    fut = asyncio.wrap_future(ticket.future)
    fut.add_done_callback(_consume)

    async def watch() -> None:
        while not fut.done():
            if await request.is_disconnected():
                ticket.cancel()
                return
            await asyncio.sleep(_DISCONNECT_POLL_S)

    watcher = asyncio.create_task(watch())
    try:
        return await asyncio.wait_for(asyncio.shield(fut), max(0.0, ticket.deadline - time.monotonic()))
    except TimeoutError:
        ticket.cancel()
        raise APIError(
            504, "deadline_exceeded", f"no result within {timeout_s:g} s (queue wait included)"
        ) from None
    finally:
        watcher.cancel()


def _consume(fut: asyncio.Future[Result]) -> None:
    # A result nobody waits for any more (timed out, client gone) must not log "never retrieved".
    if not fut.cancelled():
        fut.exception()


def _server_timing(timings: dict[str, float]) -> str:
    return ", ".join(f"{name};dur={ms:.2f}" for name, ms in timings.items())


def _timings(result: Result, decode_ms: float, queue_ms: float, encode_ms: float) -> dict[str, float]:
    out = {"decode": decode_ms, "queue": queue_ms}
    out.update({s: result.timings_ms[s] for s in STAGES})
    out["encode"] = encode_ms
    return {k: round(v, 3) for k, v in out.items()}


def _json(result: Result, encoded: bytes, fmt: OutputFormat, timings: dict[str, float]) -> CartoonJSON:
    return CartoonJSON(
        image=base64.b64encode(encoded).decode("ascii"),
        media_type=MEDIA_TYPES[fmt],
        format=fmt,
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
        no_face=result.no_face,
        timings_ms=timings,
    )


async def _encode(
    request: Request, result: Result, params: _Params, decode_ms: float, ticket: Ticket
) -> tuple[bytes, dict[str, float]]:
    """Record the result's metrics, encode it off the loop; the bytes and the full timing breakdown."""
    metrics: Metrics = request.app.state.metrics
    for stage, ms in result.timings_ms.items():
        if ms > 0:
            metrics.stage.labels(stage=stage).observe(ms / 1000)
    metrics.faces.observe(result.faces_stylized)
    start = time.perf_counter()
    encoded = await run_in_threadpool(encode, result.image, params.fmt, params.quality)
    return encoded, _timings(result, decode_ms, ticket.queue_wait_ms, (time.perf_counter() - start) * 1000)


@router.post(
    "/cartoonize",
    summary="Cartoonize one photo",
    response_model=CartoonJSON,
    responses={
        200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}, "description": "the cartoon"},
        400: {"description": "corrupt or truncated image"},
        401: {"description": "missing or wrong API key"},
        413: {"description": "body or image too large"},
        415: {"description": "not a JPEG, PNG, WebP, BMP, TIFF or GIF"},
        422: {"description": "invalid field, unknown style, or no face with no_face=error"},
        503: {"description": "queue full (Retry-After) or not ready"},
        504: {"description": "deadline passed"},
    },
)
async def cartoonize(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    image: Annotated[UploadFile, File(description="the photo")],
    params: Annotated[_Params, Depends(_params)],
) -> Response:
    scheduler = params.scheduler
    decoded, decode_ms = await _read(image, state)
    timeout = state.limits.request_timeout_s
    # A full queue raises QueueFullError: 503 with Retry-After (api/errors.py).
    ticket = _submit(scheduler, params, decoded, timeout)
    result = await _wait(request, ticket, timeout)
    encoded, timings = await _encode(request, result, params, decode_ms, ticket)
    headers = {"Server-Timing": _server_timing(timings)}
    if params.response == "json":
        body = _json(result, encoded, params.fmt, timings)
        return JSONResponse(body.model_dump(mode="json"), headers=headers)
    headers["X-Faces-Stylized"] = str(result.faces_stylized)
    return Response(encoded, media_type=MEDIA_TYPES[params.fmt], headers=headers)


_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


def _zip_name(index: int, filename: str | None, fmt: str) -> str:
    stem = _SAFE_NAME.sub("_", (filename or "image").rsplit("/", 1)[-1].rsplit(".", 1)[0])[:64] or "image"
    return f"{index + 1:03d}-{stem}.{'jpg' if fmt == 'jpeg' else fmt}"


def _error_item(name: str, exc: Exception) -> BatchItem:
    if isinstance(exc, APIError):
        return BatchItem(filename=name, status=exc.status, error={"code": exc.code, "message": exc.message})
    if isinstance(exc, ToonserveError):
        status, code = status_for(exc)
        return BatchItem(filename=name, status=status, error={"code": code, "message": str(exc)})
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
        },
        503: {"description": "the queue cannot take this many images now (Retry-After)"},
    },
)
async def cartoonize_batch(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    images: Annotated[list[UploadFile], File(description="the photos")],
    params: Annotated[_Params, Depends(_params)],
) -> Response:
    scheduler = params.scheduler
    response = params.response
    if len(images) > state.limits.max_batch_files:
        raise APIError(
            413, "too_many_files", f"{len(images)} files; the limit is {state.limits.max_batch_files}"
        )
    names = [u.filename or f"image-{i + 1}" for i, u in enumerate(images)]
    decoded: list[tuple[DecodedImage, float] | Exception] = []
    for upload in images:
        try:
            decoded.append(await _read(upload, state))
        except ToonserveError as exc:
            decoded.append(exc)
    valid = sum(not isinstance(d, Exception) for d in decoded)
    free = scheduler.queue_size - scheduler.depth
    if valid > free:
        wait = scheduler.retry_after()
        raise APIError(
            503, "queue_full", f"{valid} images do not fit the queue ({free} free); retry in about {wait} s",
            headers={"Retry-After": str(wait)},
        )  # fmt: skip
    timeout = state.limits.request_timeout_s
    tickets: list[Ticket | Exception] = []
    for d in decoded:
        if isinstance(d, Exception):
            tickets.append(d)
            continue
        try:
            tickets.append(_submit(scheduler, params, d[0], timeout))
        except QueueFullError as exc:  # raced with another request for the last slots
            tickets.append(exc)
    waits = [_wait(request, t, timeout) if isinstance(t, Ticket) else _failed(t) for t in tickets]
    outcomes = await asyncio.gather(*waits, return_exceptions=True)
    items: list[BatchItem] = []
    files: list[tuple[str, bytes]] = []
    for i, (name, d, t, outcome) in enumerate(zip(names, decoded, tickets, outcomes, strict=True)):
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, Exception):
                raise outcome
            items.append(_error_item(name, outcome))
            continue
        assert isinstance(d, tuple) and isinstance(t, Ticket)
        encoded, timings = await _encode(request, outcome, params, d[1], t)
        # In the ZIP the image is a file of its own; its report carries no base64 copy.
        report = _json(outcome, encoded if response == "json" else b"", params.fmt, timings)
        if response == "image":
            zip_name = _zip_name(i, name, params.fmt)
            files.append((zip_name, encoded))
            items.append(BatchItem(filename=name, status=200, result=report, file=zip_name))
        else:
            items.append(BatchItem(filename=name, status=200, result=report))
    body = BatchJSON(results=items)
    if response == "json":
        return JSONResponse(body.model_dump(mode="json"))
    zipped = await run_in_threadpool(_zip, files, body)
    return Response(
        zipped,
        media_type="application/zip",
        headers={"Content-Disposition": 'attachment; filename="cartoons.zip"'},
    )


async def _failed(exc: Exception) -> Result:
    raise exc


def _zip(files: Sequence[tuple[str, bytes]], manifest: BatchJSON) -> bytes:
    buf = io.BytesIO()
    # Images are already compressed; storing them avoids burning CPU for nothing.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in files:
            zf.writestr(name, data)
        zf.writestr("results.json", json.dumps(manifest.model_dump(mode="json"), indent=2))
    return buf.getvalue()
