"""A throwaway ``redis-server`` (Debian's) on a free loopback port, for tests and benchmarks.

Nothing is persisted unless asked (``--save ''``, AOF off); its working directory is a folder the
caller owns. ``make test`` installs ``redis-server`` when it is missing; without it, :meth:`start`
raises, so a test that needs Redis fails rather than being skipped.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import redis

from devkit.serve import free_port


class RedisServer:
    """``redis-server`` in a subprocess: :meth:`start`, :meth:`kill` (SIGKILL) and start again on the
    same port, :meth:`stop`."""

    def __init__(self, workdir: Path, *, port: int | None = None, appendonly: bool = False) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 15.0) -> RedisServer:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError(
                "redis-server is not installed; `make test` installs it "
                "(apt-get install -y --no-install-recommends redis-server)"
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        args = [exe, "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.workdir)]
        args += ["--save", "", "--daemonize", "no", "--logfile", ""]
        args += ["--appendonly", "yes" if self.appendonly else "no"]
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"redis-server did not start on port {self.port}: {tail}")
                time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: Redis disappears at once (clients see connection errors)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def client(self) -> redis.Redis:
        """A client of this server (strings decoded)."""
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True)
