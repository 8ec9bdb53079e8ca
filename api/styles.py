"""``GET /styles``: the seven DCT-Net styles, which are configured and loaded here, and from where."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from api.health import backend_fields, precision_fields, service_precision
from api.openapi import (
    BACKEND_DESCRIPTION,
    BACKEND_EXCLUDED_DESCRIPTION,
    BACKEND_REASON_DESCRIPTION,
    BACKEND_TIMES_DESCRIPTION,
    COMMON_CODES,
    SERVICE_DTYPE_DESCRIPTION,
    SERVICE_DTYPE_REASON_DESCRIPTION,
    SOURCE_DESCRIPTION,
    STYLE_DTYPE_DESCRIPTION,
    STYLE_DTYPE_REASON_DESCRIPTION,
    responses,
)
from api.state import ServiceState, get_state
from inference.backends import BackendName
from inference.styles import STYLES
from inference.weights import WeightsKind

router = APIRouter(tags=["styles"])


class StyleInfo(BaseModel):
    name: str = Field(description="the style's name, as requests give it")
    model_id: str = Field(description="its ModelScope model id")
    revision: str | None = Field(
        description="the ModelScope revision it is pinned to; null: the hub's default"
    )
    description: str = Field(description="what it looks like")
    configured: bool = Field(description="whether this server loads it (TOONSERVE_STYLES)")
    state: Literal["not_configured", "loading", "loaded", "failed"] = Field(description="where it stands")
    loaded: bool = Field(description="whether requests can use it now")
    default: bool = Field(description="whether requests naming no style get it")
    weights_source: str | None = Field(description="where its weights came from, once loaded")
    source: WeightsKind | None = Field(description=SOURCE_DESCRIPTION)
    version: str | None = Field(
        description="its weights' version once loaded (a digest of the files): cached results and ETags "
        "are tied to it"
    )
    backend: BackendName | None = Field(description=BACKEND_DESCRIPTION)
    backend_reason: str | None = Field(description=BACKEND_REASON_DESCRIPTION)
    backend_times_ms: dict[str, float] | None = Field(description=BACKEND_TIMES_DESCRIPTION)
    backend_excluded: dict[str, str] | None = Field(description=BACKEND_EXCLUDED_DESCRIPTION)
    dtype: str | None = Field(description=STYLE_DTYPE_DESCRIPTION)
    dtype_reason: str | None = Field(description=STYLE_DTYPE_REASON_DESCRIPTION)
    error: str | None = Field(description="why it failed to load, and how to fix it")
    next_attempt_in_s: float | None = Field(description="seconds until the next attempt to load it")


class StyleList(BaseModel):
    styles: list[StyleInfo] = Field(description="all seven styles")
    device: str = Field(description="where the models run, e.g. cpu or cuda:0")
    dtype: str = Field(description=SERVICE_DTYPE_DESCRIPTION)
    dtype_reason: str = Field(description=SERVICE_DTYPE_REASON_DESCRIPTION)


@router.get(
    "/styles",
    response_model=StyleList,
    summary="Available styles and which are loaded",
    responses=responses(*COMMON_CODES),
)
async def list_styles(state: Annotated[ServiceState, Depends(get_state)]) -> StyleList:
    engine = state.engine
    statuses = engine.status()
    out = []
    for name, style in STYLES.items():
        status = statuses.get(name)
        wait = status.next_attempt_in() if status else None
        out.append(
            StyleInfo(
                name=name,
                model_id=style.model_id,
                revision=style.revision,
                description=style.description,
                configured=status is not None,
                state=status.state if status else "not_configured",
                loaded=status is not None and status.state == "loaded",
                default=name == engine.default_style,
                weights_source=status.source if status else None,
                source=status.weights if status else None,
                version=status.version if status else None,
                **backend_fields(status.backend if status and status.state == "loaded" else None),
                **precision_fields(status.precision if status and status.state == "loaded" else None),
                error=status.error if status else None,
                next_attempt_in_s=None if wait is None else round(wait, 1),
            )
        )
    precision = service_precision(engine)
    return StyleList(
        styles=out, device=str(engine.store.device), dtype=precision.name, dtype_reason=precision.reason
    )
