"""Giving memory back after a burst (glibc's allocator, on Linux).

Decoding, encoding and the pipeline allocate and free large buffers from several threads. glibc gives
each thread that allocates concurrently its own arena (up to 8 per core) and keeps freed memory in
them for reuse, so after a burst of large requests the process can hold hundreds of megabytes it no
longer uses, spread over arenas no single ``free`` returns. Two measures, both measured in
``bench/soak.py``:

* fewer arenas (``mallopt(M_ARENA_MAX, n)``, set before the threads start; like the
  ``MALLOC_ARENA_MAX`` environment variable) — less memory stranded in idle arenas, for a little more
  lock contention in malloc, which this service hardly feels: its hot loops are in oneDNN and zlib;
* ``malloc_trim(0)`` whenever the device's worker has been idle for a moment after work, and at least
  every 10 s while it works without a pause (under steady load it is never idle, and the
  arenas' high-water mark would ratchet up with each mix of large requests) — returns the free pages
  of every arena to the system, in a few milliseconds.

On other platforms or C libraries both are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from functools import cache
from typing import Final

log = logging.getLogger(__name__)

#: glibc's mallopt parameter number for the arena limit (malloc.h: M_ARENA_MAX).
_M_ARENA_MAX: Final = -8

#: Seconds between trims while the worker works without a pause.
TRIM_BUSY_EVERY_S: Final = 10.0


@dataclass
class TrimPolicy:
    """When to give memory back: once the worker is idle after work, or when it has worked for
    ``busy_every_s`` since the last trim; never twice without work in between."""

    last_trim: float
    busy_every_s: float = TRIM_BUSY_EVERY_S
    seen: int = 0

    def due(self, now: float, idle: bool, batches_done: int) -> bool:
        if batches_done == self.seen:
            return False
        if idle or now - self.last_trim >= self.busy_every_s:
            self.seen, self.last_trim = batches_done, now
            return True
        return False


@cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas (call early, before worker threads exist); False where unsupported.
    0 leaves glibc's default."""
    libc = _libc()
    if libc is None or arenas <= 0:
        return False
    ok = bool(libc.mallopt(ctypes.c_int(_M_ARENA_MAX), ctypes.c_int(arenas)))
    if ok:
        log.debug("malloc arenas capped at %d", arenas)
    return ok


def trim() -> bool:
    """Return the free memory of every malloc arena to the system; False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))
