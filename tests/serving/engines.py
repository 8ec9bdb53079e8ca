"""An engine around one test cartoonizer and a worker, without loading anything: what the flow's
tests need of an engine (its store's style, device and dtype; ``check``; the scheduler)."""

from __future__ import annotations

from pathlib import Path

from inference.models import ModelStore
from inference.pipeline import Cartoonizer
from serving.engine import Engine
from serving.scheduler import Scheduler


def bare_engine(cartoonizer: Cartoonizer, scheduler: Scheduler) -> Engine:
    """An engine whose one style is ``cartoonizer``'s (named as it is) and whose worker is
    ``scheduler`` (started by the caller)."""
    engine = Engine.__new__(Engine)
    engine.check = lambda style: None  # type: ignore[method-assign]
    style = cartoonizer.style
    engine.store = ModelStore(
        cartoonizer.device, cartoonizer.dtype, cache_dir=Path("/nonexistent"), styles={style.name: style}
    )
    engine.scheduler = scheduler
    return engine
