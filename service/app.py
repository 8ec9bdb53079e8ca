"""The application factory and its lifespan: models load once, warm up, and are released at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors, health, styles
from api.state import ServiceState
from inference.errors import ToonserveError
from inference.models import ModelStore, parse_device, parse_dtype
from service.settings import Settings, get_settings

log = logging.getLogger("toonserve")


def _load_all(state: ServiceState) -> None:
    """Load and warm up every configured style; readiness flips only if all of them succeed."""
    state.loading.set()
    try:
        for name in state.styles:
            try:
                state.store.load(name)
            except ToonserveError as exc:
                log.error("style %s not loaded: %s", name, exc)
        if all(name in state.store.styles for name in state.styles):
            state.ready.set()
            log.info("ready: %s on %s", ", ".join(state.styles), state.store.device)
    finally:
        state.loading.clear()


def build_state(settings: Settings) -> ServiceState:
    store = ModelStore(
        device=parse_device(settings.device),
        dtype=parse_dtype(settings.dtype),
        cache_dir=settings.cache_dir,
        model_dir=settings.model_dir,
        allow_download=settings.allow_download,
        backend=settings.backend,
    )
    return ServiceState(store=store, styles=list(settings.styles), default_style=settings.default_style)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load in the background after start-up; ``/readyz`` says when they're in."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.toonserve = state
        loader = asyncio.create_task(asyncio.to_thread(_load_all, state))
        try:
            yield
        finally:
            # The loading thread cannot be interrupted; wait for it so memory is released cleanly.
            await asyncio.shield(loader)
            state.store.release()

    app = FastAPI(
        title="toonserve",
        version="0.1.0",
        summary="Portrait photos to cartoons with DCT-Net, exact to the official models.",
        lifespan=lifespan,
    )
    errors.install(app)
    app.include_router(health.router)
    app.include_router(styles.router)
    return app
