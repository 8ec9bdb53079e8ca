"""A client that stops sending its request body is cut off (408) instead of holding a connection."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.reference_graphs import ReferenceModelDir
from tests.service.test_jobs_live import Service
from tests.service.test_live import _free_port

pytestmark = pytest.mark.live


@pytest.fixture
def impatient(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[Service]:
    env = dict(
        os.environ,
        TOONSERVE_PORT=str(_free_port()),
        TOONSERVE_HOST="127.0.0.1",
        TOONSERVE_MODEL_DIR=str(model_dir.path.parent),
        TOONSERVE_CACHE_DIR=str(tmp_path / "cache"),
        TOONSERVE_DATA_DIR=str(tmp_path / "data"),
        TOONSERVE_ALLOW_DOWNLOAD="false",
        TOONSERVE_DEVICE="cpu",
        TOONSERVE_BODY_TIMEOUT_S="1",
    )
    svc = Service(env, tmp_path / "server.log")
    svc.start()
    yield svc
    svc.stop()


def test_a_stalled_body_gets_408_and_the_connection_closes(impatient: Service) -> None:
    port = int(impatient.env["TOONSERVE_PORT"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = (
            "POST /cartoonize HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Content-Length: 100000\r\n\r\n"
        )
        conn.sendall(head.encode() + b"--b\r\n")  # … and then nothing more
        start = time.monotonic()
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
        waited = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"code":"request_timeout"' in answer
    assert waited < 10  # about the 1 s timeout, then the server closed the connection
