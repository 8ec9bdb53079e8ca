"""Builds the jobs side of the service from the settings: the store, the webhook sender, the runner."""

from __future__ import annotations

from api.errors import code_for
from api.metrics import Metrics
from api.state import JobsState
from jobs.events import EventHub, StreamSlots
from jobs.redis import RedisJobStore
from jobs.runner import JobRunner
from jobs.sqlite import SQLiteJobStore
from jobs.store import JobStore
from jobs.webhooks import WebhookSender
from service.settings import Settings
from serving.clips import ClipFlow
from serving.engine import Engine
from serving.flow import Flow


def build_job_store(settings: Settings) -> JobStore:
    """The job store the settings name: the embedded SQLite one on ``settings.jobs_dir``, or the
    Redis one shared by several replicas (its files on ``settings.jobs_dir``, which they all mount)."""
    if settings.jobs_backend == "redis":
        return RedisJobStore(settings.jobs_dir, settings.redis_url, lease_s=settings.job_lease_s)
    return SQLiteJobStore(settings.jobs_dir)


def build_jobs(settings: Settings, engine: Engine, flow: Flow, metrics: Metrics) -> JobsState:
    """Store, webhook sender and runner, wired to the engine's flow and the app's metrics."""
    store = build_job_store(settings)
    hub = EventHub(store)  # one reader per followed job, for all its events streams
    webhooks = WebhookSender(
        settings.webhook_secret,
        allow_private=settings.webhook_allow_private,
        attempts=settings.webhook_attempts,
        timeout_s=settings.webhook_timeout_s,
        concurrency=settings.webhook_concurrency,
        on_delivery=lambda outcome: metrics.webhooks.labels(outcome=outcome).inc(),
    )
    runner = JobRunner(
        store,
        engine,
        flow,
        webhooks,
        concurrency=settings.job_concurrency or engine.max_batch + 1,
        ttl_s=settings.job_ttl_s,
        hub=hub,
        on_item=lambda outcome: metrics.job_items.labels(outcome=outcome).inc(),
        error_code=code_for,
        # With a shared store, a style missing here may be served by another replica (a job is only
        # accepted by one that has it), so jobs are not failed for it.
        fail_unconfigured=settings.jobs_backend == "sqlite",
        clips=ClipFlow(flow, settings.video_limits),
        on_frames=lambda n: metrics.video_frames.inc(n),
    )
    return JobsState(
        store=store,
        runner=runner,
        hub=hub,
        max_files=settings.max_job_files,
        max_photo_bytes=settings.max_upload_bytes,
        quota_bytes=settings.max_job_storage_bytes,
        client_quota_bytes=settings.client_storage,
        ttl_s=settings.job_ttl_s,
        webhook_secret=bool(settings.webhook_secret),
        webhook_allow_private=settings.webhook_allow_private,
        streams=StreamSlots(per_client=settings.client_event_streams, total=settings.max_event_streams),
        etag_salt=settings.etag_salt,
        max_video_bytes=settings.max_video_bytes,
        video_chunk_s=settings.video_chunk_s,
    )
