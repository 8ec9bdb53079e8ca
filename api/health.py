"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (the default style is loaded and warm)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.errors import error_response
from api.openapi import SOURCE_DESCRIPTION, responses
from api.state import ServiceState, get_state
from inference.weights import WeightsKind
from serving.engine import Engine, StyleState

router = APIRouter(tags=["probes"])


class Health(BaseModel):
    status: str = Field(description="always ok: the process answers")


class StyleReadiness(BaseModel):
    state: StyleState = Field(description="loading, loaded, or failed (retried in the background)")
    error: str | None = Field(None, description="why it failed, and how to fix it")
    next_attempt_in_s: float | None = Field(None, description="seconds until the next attempt to load it")
    source: WeightsKind | None = Field(None, description=SOURCE_DESCRIPTION)


class Ready(BaseModel):
    status: str = Field(description="ready")
    device: str = Field(description="where the models run, e.g. cpu or cuda:0")
    dtype: str = Field(description="the generators' precision")
    dtype_reason: str = Field(description="why that precision (TOONSERVE_DTYPE=auto picks per device)")
    default_style: str = Field(description="the style a request gets when it names none")
    styles: dict[str, StyleReadiness] = Field(description="every configured style and its state")


def style_readiness(engine: Engine) -> dict[str, StyleReadiness]:
    out = {}
    for name, status in engine.status().items():
        wait = status.next_attempt_in()
        out[name] = StyleReadiness(
            state=status.state,
            error=status.error,
            next_attempt_in_s=None if wait is None else round(wait, 1),
            source=status.weights,
        )
    return out


@router.get("/healthz", response_model=Health, summary="Liveness: the process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: the default style is loaded and has run a warm-up inference",
    responses=responses("not_ready"),
)
async def readyz(state: Annotated[ServiceState, Depends(get_state)]) -> Ready | JSONResponse:
    engine = state.engine
    if not engine.ready:
        # A state, not a failure: answered without a log line (probes ask every few seconds).
        return error_response(
            "not_ready", engine.not_ready_reason(), headers={"Retry-After": str(engine.retry_after())}
        )
    store = engine.store
    return Ready(
        status="ready",
        device=str(store.device),
        dtype=str(store.dtype).removeprefix("torch."),
        dtype_reason=store.dtype_reason,
        default_style=engine.default_style,
        styles=style_readiness(engine),
    )
