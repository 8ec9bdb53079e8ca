"""The application factory and its lifespan: the engine loads in the background, serves, and drains."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline

from api import admin, cartoonize, errors, health, middleware, styles, web
from api import jobs as jobs_api
from api import metrics as metrics_api
from api.clients import Clients, load_keys, parse_networks
from api.metrics import Metrics
from api.openapi import exact_schema, video_limits_extensions
from api.state import ServiceState
from service import memory
from service.factory import build_engine, build_flow
from service.jobs import build_jobs
from service.otel import build_exporter
from service.settings import Settings, get_settings
from serving import tracing
from serving.scheduler import Scheduler

log = logging.getLogger("toonserve")

#: Every router of the API, in the order they are tried.
_ROUTERS = (
    cartoonize.router,
    jobs_api.router,
    styles.router,
    health.router,
    admin.router,
    metrics_api.router,
    web.router,
)

#: The headers a browser app on another origin may read (CORS).
EXPOSED_HEADERS = (
    "Server-Timing",
    "X-Request-ID",
    "X-Faces-Stylized",
    "Retry-After",
    "Location",
    "RateLimit",
    "RateLimit-Policy",
)


def _openapi(app: FastAPI, settings: Settings, clients: Clients) -> dict[str, Any]:
    """The generated schema, made exact (:func:`api.openapi.exact_schema`) for this server's limits
    and, when keys are configured, saying which routes need one."""
    if app.openapi_schema is None:
        app.openapi_schema = exact_schema(
            FastAPI.openapi(app),
            styles=settings.styles,
            most_files={"/cartoonize/batch": settings.max_batch_files, "/jobs": settings.max_job_files},
            most_bytes={"/jobs": settings.max_job_bytes},
            default_bytes=settings.max_upload_bytes,
            is_open=middleware.is_open if clients.auth else None,
            part_limits={
                "/jobs": {
                    "video": video_limits_extensions(
                        settings.max_video_bytes,
                        settings.max_video_seconds,
                        settings.max_video_frames,
                        settings.max_video_pixels,
                    )
                }
            },
        )
    return app.openapi_schema


#: How often the worker is looked at; memory is given back once it has finished nothing for that long
#: after work (and every memory.TRIM_BUSY_EVERY_S while it works without such a pause).
_TRIM_EVERY_S = 5.0


async def _give_memory_back(scheduler: Scheduler) -> None:
    """Give freed memory back to the system after each burst of work and during long ones (see
    service.memory)."""
    policy = memory.TrimPolicy(last_trim=time.monotonic(), seen=scheduler.batches_done)
    while True:
        await asyncio.sleep(_TRIM_EVERY_S)
        if policy.due(time.monotonic(), scheduler.idle, scheduler.batches_done):
            await asyncio.to_thread(memory.trim)


def build_clients(settings: Settings) -> Clients:
    """The API keys and per-client limits the settings describe; raises ConfigurationError (with the
    entry at fault, never a key) for malformed keys."""
    keys = load_keys(
        settings.api_key.get_secret_value() if settings.api_key is not None else None,
        settings.api_keys.get_secret_value() if settings.api_keys is not None else None,
        settings.api_keys_file,
    )
    return Clients(
        keys,
        trusted_proxies=parse_networks(settings.trusted_proxies),
        queue_size=settings.client_share,
        images_per_minute=settings.client_images_per_minute,
    )


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app. The engine loads in the background after start-up; ``/readyz`` says when the
    default style is in, ``/styles`` how every style stands."""
    settings = settings or get_settings()
    metrics = Metrics()
    clients = build_clients(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        memory.limit_arenas(settings.malloc_arenas)
        memory.keep_buffers(settings.malloc_keep_mib)
        # Spans go to an OpenTelemetry collector when OTEL_EXPORTER_OTLP_ENDPOINT is set and the
        # toonserve[otel] extra is installed (service/otel.py); otherwise nothing is exported.
        exporter = build_exporter()
        previous_exporter = tracing.set_exporter(exporter) if exporter is not None else None
        engine = build_engine(
            settings,
            on_outcome=lambda outcome, client: metrics.images.labels(outcome=outcome, client=client).inc(),
        )
        flow = build_flow(settings, engine, on_result=metrics.record)
        metrics.watch_cache(flow.cache.stats)
        jobs = build_jobs(settings, engine, flow, metrics)
        app.state.toonserve = ServiceState(
            engine, flow, max_batch_files=settings.max_batch_files, jobs=jobs, clients=clients
        )
        engine.start()
        await jobs.runner.start()
        trimmer = asyncio.create_task(_give_memory_back(engine.scheduler), name="toonserve-trim")
        try:
            yield
        finally:
            trimmer.cancel()
            # Uvicorn has stopped accepting and finished in-flight requests. Job items in flight get
            # the same grace; what is left stays in the store and resumes at the next start.
            await jobs.runner.stop(settings.request_timeout_s)
            await asyncio.to_thread(engine.close, True, settings.request_timeout_s)
            flow.close()
            jobs.store.close()
            if exporter is not None:
                tracing.set_exporter(previous_exporter)
                await asyncio.to_thread(exporter.shutdown)
            log.info("stopped")

    app = FastAPIOffline(
        title="toonserve",
        version=version("toonserve"),
        summary="Portrait photos to cartoons with DCT-Net, exact to the official models.",
        lifespan=lifespan,
    )
    app.openapi = lambda: _openapi(app, settings, clients)  # type: ignore[method-assign]
    app.state.metrics = metrics
    routes = [route for router in _ROUTERS for route in router.routes]
    errors.install(app, routes)
    # Last added is outermost: CORS (so even 401/413 answers carry its headers), then request ids,
    # the Host check, metrics and the API key, then the body limit, then the docs pages' policy.
    app.add_middleware(web.DocsPolicyMiddleware)
    app.add_middleware(
        middleware.BodyLimitMiddleware,
        max_bytes=settings.max_upload_bytes,
        routes={("POST", "/jobs"): settings.max_job_bytes},
        idle_timeout_s=settings.body_timeout_s,
    )
    app.add_middleware(
        middleware.RequestContextMiddleware,
        metrics=metrics,
        clients=clients,
        # The routes themselves (FastAPI's router wraps included ones), to label early answers.
        routes=routes,
        allowed_hosts=settings.allowed_hosts,
    )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=list(EXPOSED_HEADERS),
        )
    for router in _ROUTERS:
        app.include_router(router)
    app.mount(web.ASSETS_PATH, web.assets(), name="ui")
    return app
