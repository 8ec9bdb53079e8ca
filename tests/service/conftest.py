"""Fixtures the service tests share."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The loggers ``configure`` touches, put back afterwards: their handlers write to this test's
    captured stderr, which is closed once it ends."""
    loggers = [logging.getLogger(name) for name in ("", "modelscope", "modelscope_hub")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for logger, handlers, level, propagate in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate = propagate or not handlers
