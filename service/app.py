"""The application factory and its lifespan: models load once, warm up, and are released at shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api import cartoonize, errors, health, middleware, styles
from api import metrics as metrics_api
from api.metrics import Metrics
from api.state import Limits, RequestDefaults, ServiceState
from inference.errors import ToonserveError
from inference.faces import create_detector
from inference.models import ModelStore, parse_device, parse_dtype
from inference.pipeline import Cartoonizer, Options
from inference.scheduler import Scheduler
from service.settings import Settings, get_settings

log = logging.getLogger("toonserve")

#: Side of the blank image pushed through each style's whole pipeline before readiness.
_WARMUP_SIDE = 128


def _load_all(state: ServiceState, settings: Settings, metrics: Metrics) -> None:
    """Load every configured style, build the device's pipelines and worker, warm them up, flip ready."""
    state.loading.set()
    try:
        for name in state.styles:
            try:
                state.store.load(name)
            except ToonserveError as exc:
                log.error("style %s not loaded: %s", name, exc)
        if not all(name in state.store.styles for name in state.styles):
            return
        try:
            detector = create_detector("mtcnn", state.store.device)
        except ToonserveError as exc:
            state.store.failures["face detector"] = str(exc)
            log.error("face detector not loaded: %s", exc)
            return
        # On CPU, batching large images is slower per image than one at a time (memory-bound; see
        # inference.pipeline.DEFAULT_BG_BATCH), so the worker takes one image at a time there by default.
        max_batch = settings.max_batch or (8 if state.store.device.type == "cuda" else 1)
        cartoonizers = {
            name: Cartoonizer(
                state.store.get(name), detector, bg_batch=max_batch, head_batch=settings.head_batch
            )
            for name in state.styles
        }
        blank = np.full((_WARMUP_SIDE, _WARMUP_SIDE, 3), 128, dtype=np.uint8)
        for c in cartoonizers.values():
            c.run(blank, Options(no_face="background"))
        scheduler = Scheduler(
            cartoonizers,
            queue_size=settings.queue_size,
            max_batch=max_batch,
            batch_wait=settings.batch_wait_ms / 1000,
            name=str(state.store.device),
            on_outcome=lambda outcome: metrics.images.labels(outcome=outcome).inc(),
        )
        scheduler.start()
        state.scheduler = scheduler
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
    return ServiceState(
        store=store,
        styles=list(settings.styles),
        default_style=settings.default_style,
        defaults=RequestDefaults(
            processing_size=settings.processing_size,
            output_format=settings.output_format,
            quality=settings.quality,
            min_face_size=settings.min_face_size,
            max_faces=settings.max_faces,
        ),
        limits=Limits(
            max_pixels=settings.max_pixels,
            max_batch_files=settings.max_batch_files,
            request_timeout_s=settings.request_timeout_s,
        ),
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. Models load in the background after start-up; ``/readyz`` says when they're in."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings)
        app.state.toonserve = state
        loader = asyncio.create_task(asyncio.to_thread(_load_all, state, settings, metrics))
        try:
            yield
        finally:
            # Uvicorn has stopped accepting and finished in-flight requests; finish queued work too.
            await asyncio.shield(loader)
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.close, True, settings.request_timeout_s)
            state.store.release()
            log.info("stopped")

    app = FastAPI(
        title="toonserve",
        version="0.1.0",
        summary="Portrait photos to cartoons with DCT-Net, exact to the official models.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    errors.install(app)
    # Last added is outermost: CORS (so even 401/413 answers carry its headers), then request ids,
    # metrics and the API key, then the body limit.
    app.add_middleware(middleware.BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(middleware.RequestContextMiddleware, metrics=metrics, api_key=settings.api_key)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
            expose_headers=["Server-Timing", "X-Request-ID", "X-Faces-Stylized", "Retry-After"],
        )
    app.include_router(cartoonize.router)
    app.include_router(styles.router)
    app.include_router(health.router)
    app.include_router(metrics_api.router)
    return app
