"""What the routes read: the engine (models, worker), the request flow, and the HTTP-only limits.

``service/`` builds it once per app (in the lifespan) and stores it on ``app.state.toonserve``.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from inference.engine import Engine
from inference.flow import Flow


@dataclass
class ServiceState:
    engine: Engine
    flow: Flow
    #: Most files in one ``POST /cartoonize/batch``.
    max_batch_files: int


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.toonserve
    return state
