"""What the routes read: the resident models and the service's readiness, built by ``service/``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fastapi import Request

from inference.models import ModelStore


@dataclass
class ServiceState:
    """Shared by every request; ``ready`` flips once every configured style is loaded and warm."""

    store: ModelStore
    styles: list[str]
    default_style: str
    ready: threading.Event = field(default_factory=threading.Event)
    loading: threading.Event = field(default_factory=threading.Event)

    def not_ready_reason(self) -> str:
        if self.store.failures:
            return "; ".join(f"{name}: {msg}" for name, msg in self.store.failures.items())
        if self.loading.is_set():
            missing = [s for s in self.styles if s not in self.store.styles]
            return f"loading and warming up styles: {', '.join(missing)}"
        return "models are not loaded"


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.toonserve
    return state
