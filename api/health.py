"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (the default style is loaded and warm)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from api.errors import error_response
from api.openapi import (
    BACKEND_DESCRIPTION,
    BACKEND_EXCLUDED_DESCRIPTION,
    BACKEND_REASON_DESCRIPTION,
    BACKEND_TIMES_DESCRIPTION,
    SERVICE_DTYPE_DESCRIPTION,
    SERVICE_DTYPE_REASON_DESCRIPTION,
    SOURCE_DESCRIPTION,
    STYLE_DTYPE_DESCRIPTION,
    STYLE_DTYPE_REASON_DESCRIPTION,
    responses,
)
from api.state import ServiceState, get_state
from inference.backends import BackendDecision, BackendName
from inference.models import DtypeChoice
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
    backend: BackendName | None = Field(None, description=BACKEND_DESCRIPTION)
    backend_reason: str | None = Field(None, description=BACKEND_REASON_DESCRIPTION)
    backend_times_ms: dict[str, float] | None = Field(None, description=BACKEND_TIMES_DESCRIPTION)
    backend_excluded: dict[str, str] | None = Field(None, description=BACKEND_EXCLUDED_DESCRIPTION)
    dtype: str | None = Field(None, description=STYLE_DTYPE_DESCRIPTION)
    dtype_reason: str | None = Field(None, description=STYLE_DTYPE_REASON_DESCRIPTION)


def precision_fields(precision: DtypeChoice | None) -> dict[str, Any]:
    """A style's ``dtype`` fields (None until it is loaded)."""
    if precision is None:
        return {"dtype": None, "dtype_reason": None}
    return {"dtype": precision.name, "dtype_reason": precision.reason}


def service_precision(engine: Engine) -> DtypeChoice:
    """The service's precision as /readyz and /styles report it: the default style's once loaded
    (``auto`` may pick int8 per style), the store's before."""
    return engine.store.precision_of(engine.default_style)


def backend_fields(decision: BackendDecision | None) -> dict[str, Any]:
    """A style's ``backend*`` fields (all None until it is loaded)."""
    if decision is None:
        return {"backend": None, "backend_reason": None, "backend_times_ms": None, "backend_excluded": None}
    return {
        "backend": decision.backend,
        "backend_reason": decision.reason,
        "backend_times_ms": dict(decision.times_ms),
        "backend_excluded": dict(decision.excluded),
    }


class Ready(BaseModel):
    status: str = Field(description="ready")
    device: str = Field(description="where the models run, e.g. cpu or cuda:0")
    dtype: str = Field(description=SERVICE_DTYPE_DESCRIPTION)
    dtype_reason: str = Field(description=SERVICE_DTYPE_REASON_DESCRIPTION)
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
            **backend_fields(status.backend if status.state == "loaded" else None),
            **precision_fields(status.precision if status.state == "loaded" else None),
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
    precision = service_precision(engine)
    return Ready(
        status="ready",
        device=str(engine.store.device),
        dtype=precision.name,
        dtype_reason=precision.reason,
        default_style=engine.default_style,
        styles=style_readiness(engine),
    )
