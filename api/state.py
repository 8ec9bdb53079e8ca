"""What the routes read: the engine (models, worker), the request flow, the jobs, and the HTTP limits.

``service/`` builds it once per app (in the lifespan) and stores it on ``app.state.toonserve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from api.clients import Clients, RateLimiter
from jobs.events import EventHub, StreamSlots
from jobs.runner import JobRunner
from jobs.store import JobStore
from serving.engine import Engine
from serving.flow import Flow


@dataclass
class JobsState:
    """What the jobs routes need."""

    store: JobStore
    runner: JobRunner
    hub: EventHub
    max_files: int
    #: Largest photo in a job (the largest body ``/cartoonize`` takes); larger ones fail on arrival.
    max_photo_bytes: int
    quota_bytes: int
    #: The share of ``quota_bytes`` one client's jobs may hold (a key may have its own).
    client_quota_bytes: int
    ttl_s: float
    #: Whether a webhook secret is configured (webhooks are refused without one).
    webhook_secret: bool
    webhook_allow_private: bool
    #: Open events streams per client and in all, and their caps.
    streams: StreamSlots
    #: Mixed into the ETags of job downloads (``TOONSERVE_ETAG_SALT``).
    etag_salt: str = ""
    #: Largest clip a video job takes (``TOONSERVE_MAX_VIDEO_BYTES``).
    max_video_bytes: int = 0
    #: About how long a video job's chunks are (``TOONSERVE_VIDEO_CHUNK_S``).
    video_chunk_s: float = 10.0


@dataclass
class ServiceState:
    engine: Engine
    flow: Flow
    #: Most files in one ``POST /cartoonize/batch``.
    max_batch_files: int
    jobs: JobsState
    clients: Clients = field(default_factory=Clients)
    #: Images per minute per client (when a rate is configured).
    rates: RateLimiter = field(default_factory=RateLimiter)


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.toonserve
    return state
