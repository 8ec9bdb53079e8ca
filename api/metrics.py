"""Prometheus metrics: requests by route and status, latency, queue, in-flight, stages, faces.

One registry per app (not the process-global default), so several apps in one process (tests) do
not collide.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from api.state import ServiceState, get_state
from inference.pipeline import Result
from jobs.errors import JobStoreError
from jobs.model import JOB_STATUSES
from serving.result_cache import CacheStats

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def record(self, result: Result) -> None:
        """A finished image's stage durations and face count."""
        for stage, ms in result.timings_ms.items():
            if ms > 0:
                self.stage.labels(stage=stage).observe(ms / 1000)
        self.faces.observe(result.faces_stylized)

    def watch_cache(self, stats: Callable[[], CacheStats] | None) -> None:
        """Report this result cache's counts, read at each scrape (None: no cache to report)."""
        self._cache.stats = stats

    def __post_init__(self) -> None:
        r = self.registry
        self._cache = _CacheCollector()
        r.register(self._cache)
        self.requests = Counter(
            "toonserve_requests",
            "HTTP requests by route, status and client (API key name, or anonymous)",
            ["route", "status", "client"],
            registry=r,
        )
        self.latency = Histogram(
            "toonserve_request_duration_seconds",
            "HTTP request latency by route and client",
            ["route", "client"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("toonserve_in_flight_requests", "HTTP requests being handled", registry=r)
        self.queue_depth = Gauge(
            "toonserve_queue_depth", "Images waiting for the worker", ["device"], registry=r
        )
        self.stage = Histogram(
            "toonserve_stage_duration_seconds",
            "Pipeline stage durations",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.faces = Histogram(
            "toonserve_faces_per_image",
            "Faces stylised per image",
            buckets=(0, 1, 2, 3, 4, 6, 8, 10, 20),
            registry=r,
        )
        self.images = Counter(
            "toonserve_images",
            "Images by outcome (ok, no_face, cancelled: client gone, deadline, rejected: queue full or the "
            "client's share full, error) and client",
            ["outcome", "client"],
            registry=r,
        )
        self.jobs = Gauge("toonserve_jobs", "Stored jobs by status", ["status"], registry=r)
        self.job_items = Counter(
            "toonserve_job_items",
            "Job items that ended, by outcome: ok, error, cancelled",
            ["outcome"],
            registry=r,
        )
        self.video_frames = Counter(
            "toonserve_video_frames",
            "Frames of video jobs written (rate(): the frames per second this process makes)",
            registry=r,
        )
        self.job_items_waiting = Gauge(
            "toonserve_job_items_waiting", "Job items queued, in every stored job", registry=r
        )
        self.job_storage = Gauge(
            "toonserve_job_storage_bytes", "Bytes the stored jobs use or reserve", registry=r
        )
        self.event_streams = Gauge(
            "toonserve_job_event_streams", "Job events streams open (GET /jobs/{id}/events)", registry=r
        )
        self.webhooks = Counter(
            "toonserve_webhook_deliveries",
            "Webhook attempts by outcome: delivered, retried, failed (gave up), refused (address barred)",
            ["outcome"],
            registry=r,
        )


class _CacheCollector(Collector):
    """The result cache's hits, misses, evictions and holdings, as the cache counts them."""

    def __init__(self) -> None:
        #: Where the counts come from (set once the app has its flow).
        self.stats: Callable[[], CacheStats] | None = None

    def collect(self) -> Iterable[Metric]:
        if self.stats is None:
            return
        now = self.stats()
        yield CounterMetricFamily(
            "toonserve_result_cache_hits",
            "Images finished from what the models made of the same photo before (or for another of the "
            "client's requests in flight): only strength, resize and encode ran",
            value=now.hits,
        )
        yield CounterMetricFamily(
            "toonserve_result_cache_misses", "Images the models ran on", value=now.misses
        )
        yield CounterMetricFamily(
            "toonserve_result_cache_evictions",
            "Entries let go to make room (least recently used first)",
            value=now.evictions,
        )
        yield GaugeMetricFamily(
            "toonserve_result_cache_bytes", "Bytes of pixels the cache holds", value=now.bytes
        )
        yield GaugeMetricFamily("toonserve_result_cache_entries", "Photos the cache holds", value=now.entries)
        yield GaugeMetricFamily(
            "toonserve_result_cache_capacity_bytes",
            "The most the cache may hold (TOONSERVE_RESULT_CACHE_BYTES)",
            value=now.capacity,
        )


router = APIRouter(tags=["probes"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request, state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    m: Metrics = request.app.state.metrics
    scheduler = state.engine.scheduler
    m.queue_depth.labels(device=scheduler.name).set(scheduler.depth)
    m.event_streams.set(state.jobs.streams.open())
    store = state.jobs.store
    try:
        counts, waiting, usage = await asyncio.to_thread(
            lambda: (store.counts(), store.waiting(), store.usage())
        )
    except JobStoreError as exc:
        # The job store is down (Redis unreachable): every other metric still matters, so the job
        # gauges keep their last values rather than failing the scrape.
        log.warning("metrics: job store figures unavailable: %s", exc)
    else:
        for status in JOB_STATUSES:
            m.jobs.labels(status=status).set(counts.get(status, 0))
        m.job_items_waiting.set(waiting)
        m.job_storage.set(usage)
    return Response(generate_latest(m.registry), media_type=CONTENT_TYPE_LATEST)
