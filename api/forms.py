"""The option fields every photo-taking route shares (``/cartoonize``, its batch, ``/jobs``).

Declared once, as a dependency that validates them once and returns the request flow's
:class:`~inference.flow.Params`. Bounds and choices come from the inference constants; a field left
out takes the service's setting (named in its description).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Final

from fastapi import Depends, Form, Request, UploadFile

from api.errors import MAX_FILENAME_LENGTH, APIError
from api.state import ServiceState, get_state
from inference.flow import Params
from inference.images import DEFAULT_OUTPUT_FORMAT, MAX_QUALITY, MIN_QUALITY, OUTPUTS, OutputFormat
from inference.pipeline import (
    DEFAULT_NO_FACE,
    DEFAULT_PROCESSING_SIZE,
    DEFAULT_STRENGTH,
    MAX_OUTPUT_SIDE,
    MAX_PROCESSING_SIZE,
    MIN_OUTPUT_SIDE,
    MIN_PROCESSING_SIZE,
    NoFacePolicy,
)
from inference.weights import STYLES

StyleField = Annotated[
    str | None,
    Form(description=f"{', '.join(STYLES)}; default: TOONSERVE_DEFAULT_STYLE", examples=["anime"]),
]
StrengthField = Annotated[
    float,
    Form(ge=0.0, le=1.0, description="1 = the cartoon, 0 = the photo, between: a blend", examples=[0.8]),
]
ProcessingField = Annotated[
    int | None,
    Form(
        ge=MIN_PROCESSING_SIZE,
        le=MAX_PROCESSING_SIZE,
        description=f"short side the photo is processed at; default: TOONSERVE_PROCESSING_SIZE "
        f"({DEFAULT_PROCESSING_SIZE})",
        examples=[1024],
    ),
]
OutputSizeField = Annotated[
    int | None,
    Form(
        ge=MIN_OUTPUT_SIDE,
        le=MAX_OUTPUT_SIDE,
        description="long side of the result; default: the input's",
        examples=[1024],
    ),
]
FormatField = Annotated[
    OutputFormat | None,
    Form(
        alias="format",
        description=f"{', '.join(OUTPUTS)}; default: TOONSERVE_OUTPUT_FORMAT ({DEFAULT_OUTPUT_FORMAT})",
        examples=["jpeg"],
    ),
]
QualityField = Annotated[
    int | None,
    Form(
        ge=MIN_QUALITY,
        le=MAX_QUALITY,
        description="JPEG/WebP quality; default: TOONSERVE_QUALITY",
        examples=[85],
    ),
]
NoFaceField = Annotated[
    NoFacePolicy,
    Form(
        description="without a face: background (whole-photo cartoon), error (422) or passthrough (the photo)"
    ),
]


#: The option fields of the photo routes; an empty value is refused rather than taken as left out.
_FIELDS: Final = (
    "style",
    "strength",
    "processing_size",
    "output_size",
    "format",
    "quality",
    "no_face",
    "response",
    "webhook",
)


async def request_params(
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    style: StyleField = None,
    strength: StrengthField = DEFAULT_STRENGTH,
    processing_size: ProcessingField = None,
    output_size: OutputSizeField = None,
    fmt: FormatField = None,
    quality: QualityField = None,
    no_face: NoFaceField = DEFAULT_NO_FACE,
) -> Params:
    """The shared option fields as the flow's parameters. An unknown, unconfigured, loading or failed
    style is refused here, before any upload is looked at. A field sent empty is refused (422): the
    form parser would otherwise take it as left out, and the request would silently get a default."""
    form = await request.form()  # already parsed for the parameters: this reads the cache
    empty = [name for name in _FIELDS if any(value == "" for value in form.getlist(name))]
    if empty:
        raise APIError("invalid_request", "; ".join(f"{name}: must not be empty" for name in empty))
    return state.flow.params(
        style=style,
        strength=strength,
        processing_size=processing_size,
        output_size=output_size,
        fmt=fmt,
        quality=quality,
        no_face=no_face,
    )


RequestParams = Annotated[Params, Depends(request_params)]


def check_filenames(uploads: Sequence[UploadFile]) -> None:
    """422 ``filename_too_long`` for an uploaded file name over :data:`MAX_FILENAME_LENGTH`: it is
    echoed in reports and used in ZIP entry names."""
    for upload in uploads:
        name = upload.filename or ""
        if len(name) > MAX_FILENAME_LENGTH:
            raise APIError(
                "filename_too_long",
                f"a file name of {len(name)} characters ({name[:40]!r}…); at most {MAX_FILENAME_LENGTH}",
            )
