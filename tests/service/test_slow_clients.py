"""A client that stops sending its request body is cut off (408) instead of holding a connection."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env

pytestmark = pytest.mark.live


@pytest.fixture
def impatient(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[LiveService]:
    env = service_env(model_dir.path.parent, tmp_path, TOONSERVE_BODY_TIMEOUT_S="1")
    with LiveService(env, tmp_path / "server.log") as svc:
        yield svc


def test_a_stalled_body_gets_408_and_the_connection_closes(impatient: LiveService) -> None:
    port = impatient.port
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
