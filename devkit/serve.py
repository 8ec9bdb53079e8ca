"""A real ``toonserve serve`` in a subprocess on a free loopback port, for tests and benchmarks.

    env = service_env(models, tmp, TOONSERVE_DTYPE="float32")
    with LiveService(env, tmp / "server.log") as svc:
        status, body = svc.get("/readyz")

The service runs exactly as a user starts it (``python -m service.cli serve``, settings from the
environment), on 127.0.0.1 only. :meth:`LiveService.start` waits for ``/readyz``; it can be stopped,
killed (``kill -9``) and started again on the same data directory.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any


def server_timing(header: str) -> dict[str, float]:
    """A ``Server-Timing`` header as ``{stage: milliseconds}``; entries without a duration are left
    out."""
    stages = {}
    for part in header.split(","):
        name, _, dur = part.strip().partition(";dur=")
        if dur:
            stages[name] = float(dur)
    return stages


def free_port() -> int:
    """A TCP port free on the loopback interface right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def service_env(models: Path, tmp: Path, **settings: str) -> dict[str, str]:
    """This process's environment plus the settings of a loopback service on a free port that serves
    the model directories under ``models`` (``<models>/<style>/``), keeps its cache and job data under
    ``tmp``, and never downloads; ``settings`` (``TOONSERVE_*=value``) override or add."""
    env = dict(
        os.environ,
        TOONSERVE_PORT=str(free_port()),
        TOONSERVE_HOST="127.0.0.1",
        TOONSERVE_MODEL_DIR=str(models),
        TOONSERVE_CACHE_DIR=str(tmp / "cache"),
        TOONSERVE_DATA_DIR=str(tmp / "data"),
        TOONSERVE_ALLOW_DOWNLOAD="false",
        TOONSERVE_DEVICE="cpu",
        TOONSERVE_LOG_FORMAT="json",
    )
    env.update(settings)
    return env


class LiveService:
    """``toonserve serve`` in a subprocess (module docstring)."""

    def __init__(self, env: dict[str, str], log: Path | None = None) -> None:
        self.env = env
        self.log = log
        self.port = int(env["TOONSERVE_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> LiveService:
        """Start it and wait until ``/readyz`` answers 200 (AssertionError with the log if not)."""
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> LiveService:
        """Start the process and return at once (several replicas start side by side)."""
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab") if self.log is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "serve"], env=self.env, stdout=out, stderr=out
            )
        finally:
            if self.log is not None and not isinstance(out, int):
                out.close()
        return self

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until ``/readyz`` answers 200; AssertionError with the log's tail if it exits or times out."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.get("/readyz", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(f"the service exited: {self.log_tail()}")
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"the service was not ready within {timeout:g} s: {self.log_tail()}")

    def runner_id(self) -> str:
        """The id its job runner announced in the (JSON) log: whose leases are whose."""
        text = self.log.read_text() if self.log is not None and self.log.exists() else ""
        for line in text.splitlines():
            message = json.loads(line).get("message", "") if line.startswith("{") else ""
            if message.startswith("jobs: runner ") and message.endswith(" started"):
                return str(message.split()[2])
        raise AssertionError(f"no runner id in {self.log}")

    @property
    def pid(self) -> int:
        """The server process's id (for measuring its memory)."""
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text()[-chars:] if self.log is not None and self.log.exists() else ""

    def kill(self) -> None:
        """``kill -9``: no drain, no clean-up."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait: the graceful shutdown; its exit code."""
        assert self.proc is not None
        self.proc.terminate()
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def stop(self) -> None:
        """Gone, whatever it was doing (for fixtures' clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None

    def get(self, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return int(r.status), r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def job(self, job_id: str) -> dict[str, Any]:
        status, body = self.get(f"/jobs/{job_id}")
        assert status == 200, body
        data: dict[str, Any] = json.loads(body)
        return data

    def __enter__(self) -> LiveService:
        return self.start() if self.proc is None else self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
