"""A process's memory as the kernel counts it, for tests and benches that measure a live service."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import TracebackType


def resident_mib(pid: int | str = "self", field: str = "VmRSS") -> float:
    """A memory field of ``/proc/<pid>/status`` in MiB: ``VmRSS`` (resident now) or ``VmHWM`` (its
    peak); NaN when the process or the field is not there."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class RssRise:
    """How far a process's resident memory rises above where it was, sampled every ``every_s`` while
    the ``with`` block runs (for another process, whose own peak counter cannot be reset)."""

    def __init__(self, pid: int, every_s: float = 0.01) -> None:
        self.pid = pid
        self.every_s = every_s
        self.before = resident_mib(pid)
        self.peak = self.before
        self._done = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    @property
    def rise(self) -> float:
        """MiB above the resident size at the start, at the highest sample."""
        return self.peak - self.before

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, resident_mib(self.pid))
            time.sleep(self.every_s)

    def __enter__(self) -> RssRise:
        self._sampler.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._done.set()
        self._sampler.join()
        self.peak = max(self.peak, resident_mib(self.pid))
