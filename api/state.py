"""What the routes read: resident models, the scheduler, defaults and limits; built by ``service/``."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fastapi import Request

from inference.images import OutputFormat
from inference.models import ModelStore
from inference.scheduler import Scheduler


@dataclass(frozen=True)
class RequestDefaults:
    """Per-request values used when a request does not give them (from the settings)."""

    processing_size: int = 720
    output_format: OutputFormat = "png"
    quality: int = 90
    min_face_size: float = 24.0
    max_faces: int = 10


@dataclass(frozen=True)
class Limits:
    max_pixels: int = 40_000_000
    max_batch_files: int = 16
    request_timeout_s: float = 60.0


@dataclass
class ServiceState:
    """Shared by every request; ``ready`` flips once every configured style is loaded and warm."""

    store: ModelStore
    styles: list[str]
    default_style: str
    defaults: RequestDefaults = field(default_factory=RequestDefaults)
    limits: Limits = field(default_factory=Limits)
    scheduler: Scheduler | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    loading: threading.Event = field(default_factory=threading.Event)

    def not_ready_reason(self) -> str:
        if self.store.failures:
            return "; ".join(f"{name}: {msg}" for name, msg in self.store.failures.items())
        if self.loading.is_set():
            missing = [s for s in self.styles if s not in self.store.styles]
            if missing:
                return f"loading and warming up styles: {', '.join(missing)}"
            return "warming up the pipeline"
        return "models are not loaded"


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.toonserve
    return state
