"""A request's choices, typed once: what the photo routes' form fields, the CLIs' flags and a stored
job all carry.

:class:`RequestOptions` is what a caller sends: every field bounded here, and only here (the form
fields of the routes *are* this model, so their OpenAPI bounds come from it); a field left out is
None, "the service's default". :meth:`RequestOptions.resolved` fills those from the service's own
:class:`ResolvedOptions` (built from its settings), and a job stores the resolved options, so a
later change of the defaults does not change a job already accepted. The pipeline's
:class:`~inference.pipeline.Options` are derived from them by the request flow.

Torch-free: the jobs CLI builds and checks options without loading the model library.

Adding a request option: a field here (with its bounds and description), its constant in
:mod:`inference.constants` (or :mod:`serving.images`), and where the flow hands it to the pipeline
(:meth:`serving.flow.Flow.pipeline_options`).
"""

from __future__ import annotations

from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inference.constants import (
    DEFAULT_NO_FACE,
    DEFAULT_PROCESSING_SIZE,
    DEFAULT_STRENGTH,
    MAX_OUTPUT_SIDE,
    MAX_PROCESSING_SIZE,
    MIN_OUTPUT_SIDE,
    MIN_PROCESSING_SIZE,
    NoFacePolicy,
)
from inference.errors import OptionsError
from inference.styles import STYLES
from serving.encoding import (
    DEFAULT_OUTPUT_FORMAT,
    MAX_QUALITY,
    MEDIA_TYPES,
    MIN_QUALITY,
    OUTPUTS,
    OutputFormat,
)

#: The request options' names, in the order they are documented.
OPTION_NAMES: Final = ("style", "strength", "processing_size", "output_size", "format", "quality", "no_face")


class RequestOptions(BaseModel):
    """What a request asks for; None: the service's default (module docstring)."""

    # Frozen: options are shared between images and stored with jobs. Unknown fields are ignored
    # rather than refused, because the routes' other form fields (the files, ``response``) arrive
    # beside them.
    model_config = ConfigDict(frozen=True, extra="ignore")

    style: str | None = Field(
        None,
        min_length=1,
        description=f"{', '.join(STYLES)}; default: TOONSERVE_DEFAULT_STYLE",
        examples=["anime"],
    )
    strength: float = Field(
        DEFAULT_STRENGTH,
        ge=0.0,
        le=1.0,
        description="1 = the cartoon, 0 = the photo, between: a blend",
        examples=[0.8],
    )
    processing_size: int | None = Field(
        None,
        ge=MIN_PROCESSING_SIZE,
        le=MAX_PROCESSING_SIZE,
        description="short side the photo is processed at; default: TOONSERVE_PROCESSING_SIZE "
        f"({DEFAULT_PROCESSING_SIZE})",
        examples=[1024],
    )
    output_size: int | None = Field(
        None,
        ge=MIN_OUTPUT_SIDE,
        le=MAX_OUTPUT_SIDE,
        description="long side of the result; default: the input's",
        examples=[1024],
    )
    format: OutputFormat | None = Field(
        None,
        description=f"{', '.join(OUTPUTS)}; default: TOONSERVE_OUTPUT_FORMAT ({DEFAULT_OUTPUT_FORMAT})",
        examples=["jpeg"],
    )
    quality: int | None = Field(
        None,
        ge=MIN_QUALITY,
        le=MAX_QUALITY,
        description="JPEG/WebP quality, and a video job's (100: lossless); default: TOONSERVE_QUALITY",
        examples=[85],
    )
    no_face: NoFacePolicy = Field(
        DEFAULT_NO_FACE,
        description="without a face: background (whole-photo cartoon), error (422) or passthrough "
        "(the photo)",
    )

    @classmethod
    def make(cls, **fields: Any) -> RequestOptions:
        """Options built from Python (a CLI's flags, a stored job): a field out of range raises
        :class:`~inference.errors.OptionsError` (not pydantic's error)."""
        try:
            return cls(**fields)
        except ValidationError as exc:
            raise OptionsError(_message(exc)) from None

    def resolved(self, defaults: ResolvedOptions) -> ResolvedOptions:
        """Every field left out taken from ``defaults`` (the service's)."""
        values = {name: getattr(self, name) for name in OPTION_NAMES}
        for name, value in values.items():
            if value is None:
                values[name] = getattr(defaults, name)
        return ResolvedOptions.model_validate(values)


class ResolvedOptions(RequestOptions):
    """Options with the service's defaults filled in: what the flow runs and a job stores.
    ``output_size`` stays None for "the photo's own size"."""

    style: str = Field(min_length=1, description="the style the photos are drawn in")
    processing_size: int = Field(
        ge=MIN_PROCESSING_SIZE, le=MAX_PROCESSING_SIZE, description="short side the photos are processed at"
    )
    format: OutputFormat = Field(description="the results' format")
    quality: int = Field(
        ge=MIN_QUALITY, le=MAX_QUALITY, description="JPEG/WebP quality, and a video job's (100: lossless)"
    )

    @classmethod
    def load(cls, data: Any) -> ResolvedOptions:
        """Options stored as a dict (a job's record); OptionsError if they no longer fit."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise OptionsError(_message(exc)) from None

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]

    @property
    def suffix(self) -> str:
        """The results' file name suffix (ZIP entries, the CLI, downloads)."""
        return OUTPUTS[self.format].suffix


def _message(exc: ValidationError) -> str:
    """pydantic's errors as one line for a person: ``field: what is wrong``."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()
    )
