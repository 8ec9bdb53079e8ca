"""How long to wait before trying again: one exponential backoff for everything that retries (a style
whose weights failed to load, a job store that cannot be reached, a webhook that was not answered)."""

from __future__ import annotations

import math


def backoff_s(failures: int, initial_s: float = 1.0, max_s: float = math.inf) -> float:
    """Seconds before attempt ``failures + 1``: ``initial_s``, then twice as long after each further
    failure (``initial_s · 2^(failures - 1)``), at most ``max_s``."""
    return float(min(max_s, initial_s * 2.0 ** max(0, failures - 1)))
