"""``GET /styles``: the seven DCT-Net styles, which are loaded here, and where their weights came from."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from api.state import ServiceState, get_state
from inference.weights import STYLES

router = APIRouter(tags=["styles"])


class StyleInfo(BaseModel):
    name: str
    model_id: str
    revision: str | None
    description: str
    configured: bool
    loaded: bool
    default: bool
    weights_source: str | None
    error: str | None


class StyleList(BaseModel):
    styles: list[StyleInfo]


@router.get("/styles", response_model=StyleList, summary="Available styles and which are loaded")
async def list_styles(state: Annotated[ServiceState, Depends(get_state)]) -> StyleList:
    out = []
    for name, style in STYLES.items():
        loaded = state.store.styles.get(name)
        out.append(
            StyleInfo(
                name=name,
                model_id=style.model_id,
                revision=style.revision,
                description=style.description,
                configured=name in state.styles,
                loaded=loaded is not None,
                default=name == state.default_style,
                weights_source=loaded.weights.source if loaded else None,
                error=state.store.failures.get(name),
            )
        )
    return StyleList(styles=out)
