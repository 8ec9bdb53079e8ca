"""``POST /admin/reload``: look for the weights of every style that failed to load, now.

The engine looks for a failed style's files every few seconds by itself (``serving.engine.LOOK_S``)
and tries a download again with backoff; this asks for an attempt at once, for when the network came
back or files were put in place and waiting for the next look is not wanted. Behind the API key like
every route that is not a probe or the documentation.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from api.health import StyleReadiness, style_readiness
from api.openapi import COMMON_CODES, responses
from api.state import ServiceState, get_state

router = APIRouter(tags=["admin"])


class Reload(BaseModel):
    retrying: list[str] = Field(
        description="the failed styles that are tried again now; their state is in `styles` (and "
        "GET /styles) as the attempts go on"
    )
    styles: dict[str, StyleReadiness] = Field(description="every configured style and its state")


@router.post(
    "/admin/reload",
    response_model=Reload,
    status_code=202,
    summary="Try every style that failed to load again now (weights copied in, network back)",
    responses=responses(*COMMON_CODES),
)
async def reload(state: Annotated[ServiceState, Depends(get_state)]) -> Reload:
    engine = state.engine
    retrying = engine.retry_now()
    return Reload(retrying=retrying, styles=style_readiness(engine))
