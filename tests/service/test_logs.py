"""The service's log set-up: JSON lines, and third-party loggers brought into that format."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import free_port
from service.app import create_app
from service.logs import configure
from tests.api.conftest import jobs_settings, small_jpeg, wait_ready


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


def test_a_job_items_and_its_webhooks_lines_name_the_job_and_its_client(
    restore_logging: None, capsys: pytest.CaptureFixture[str], model_dir: ReferenceModelDir, tmp_path: Path
) -> None:
    """Log lines of a job's work carry ``job:<id>:<index>`` (or ``job:<id>:webhook``) and the client,
    as a request's lines carry its id and client."""
    configure("info", "json")
    settings = jobs_settings(
        model_dir,
        tmp_path,
        api_keys="alice=a-key",
        webhook_secret="whsec",
        webhook_allow_private=True,
        webhook_attempts=1,
        log_format="json",
    )
    truncated = small_jpeg(photos.astronaut())[:2000]  # its header reads; its pixels do not
    hook = f"http://127.0.0.1:{free_port()}/nobody-listens"
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        r = client.post(
            "/jobs",
            files=[("images", ("cut.jpg", truncated))],
            data={"webhook": hook},
            headers={"X-API-Key": "a-key"},
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        deadline = time.monotonic() + 60
        lines: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            lines += [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.startswith("{")]
            if any("not delivered" in x["message"] for x in lines):
                break
            time.sleep(0.1)
    webhook = [x for x in lines if f"webhook of job {job_id}" in x["message"]]
    assert webhook and all(
        x["request_id"] == f"job:{job_id}:webhook" and x["client"] == "alice" for x in webhook
    )
    posted = next(x for x in lines if x.get("path") == "/jobs" and x.get("method") == "POST")
    assert posted["client"] == "alice" and posted["request_id"] != "-"
    # Lines of other work (start-up, the engine) belong to no request.
    assert any(x["request_id"] == "-" for x in lines if x["logger"] != "toonserve.access")
