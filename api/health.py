"""Probes: ``/healthz`` (the process answers) and ``/readyz`` (models loaded and warmed up)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from api.errors import APIError
from api.state import ServiceState, get_state

router = APIRouter(tags=["probes"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    styles: list[str]
    device: str
    dtype: str


@router.get("/healthz", response_model=Health, summary="Liveness: the process is up")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Ready,
    summary="Readiness: every configured style is loaded and has run a warm-up inference",
    responses={503: {"description": "Still loading, or a style failed to load (the message says why)"}},
)
async def readyz(state: Annotated[ServiceState, Depends(get_state)]) -> Ready:
    if not state.ready.is_set():
        raise APIError(503, "not_ready", state.not_ready_reason(), headers={"Retry-After": "5"})
    store = state.store
    return Ready(
        status="ready",
        styles=list(store.styles),
        device=str(store.device),
        dtype=str(store.dtype).removeprefix("torch."),
    )
