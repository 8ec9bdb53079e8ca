"""The service's log set-up: JSON lines, and third-party loggers brought into that format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import configure


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


def test_modelscope_lines_come_out_as_our_json(
    restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    configure("info", "json")
    from modelscope.utils.logger import get_logger

    # What the hub client does on every import: fetch its logger (which turns propagation off again).
    get_logger().warning("Downloading [cartoon_h.pb]")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    entry = next(x for x in lines if x["message"] == "Downloading [cartoon_h.pb]")
    assert entry["logger"] == "modelscope" and entry["level"] == "warning" and "request_id" in entry
    from modelscope_hub.utils.logger import get_logger as hub_logger

    hub_logger("legacy_api").warning("listing failed, retry in 1s")
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
    assert [x["logger"] for x in lines if x["message"] == "listing failed, retry in 1s"] == [
        "modelscope_hub.legacy_api"
    ]
