"""The service's log set-up: JSON lines, and third-party loggers brought into that format."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from service.logs import configure


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    modelscope = logging.getLogger("modelscope")
    saved_ms = modelscope.handlers[:]
    yield
    root.handlers[:], _ = saved[0], root.setLevel(saved[1])
    modelscope.handlers[:] = saved_ms


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
