"""What the routes read: the engine (models, worker), the request flow, the jobs, and the HTTP limits.

``service/`` builds it once per app (in the lifespan) and stores it on ``app.state.toonserve``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from api.clients import Clients, RateLimiter
from jobs.events import EventHub
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
    quota_bytes: int
    ttl_s: float
    #: Whether a webhook secret is configured (webhooks are refused without one).
    webhook_secret: bool
    webhook_allow_private: bool


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
