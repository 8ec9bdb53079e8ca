"""A one-line progress bar for the command line."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, total: int, unit: str = "img") -> None:
        self.total = total
        self.unit = unit
        self.done = 0
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()

    def step(self, name: str) -> None:
        self.update(self.done + 1, name)

    def update(self, done: int, name: str) -> None:
        self.done = done
        if not self.tty:
            return
        width = 30
        filled = width * self.done // max(self.total, 1)
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        bar = "#" * filled + "." * (width - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {rate:.2f} {self.unit}/s {name[:40]:40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
