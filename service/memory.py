"""Giving memory back after a burst (glibc's allocator, on Linux).

Decoding, encoding and the pipeline allocate and free large buffers from several threads. glibc gives
each thread that allocates concurrently its own arena (up to 8 per core) and keeps freed memory in
them for reuse, so after a burst of large requests the process can hold hundreds of megabytes it no
longer uses, spread over arenas no single ``free`` returns. Three measures, measured in
``bench/soak.py``:

* fewer arenas (``mallopt(M_ARENA_MAX, n)``, set before the threads start; like the
  ``MALLOC_ARENA_MAX`` environment variable) — less memory stranded in idle arenas, for a little more
  lock contention in malloc, which this service hardly feels: its hot loops are in oneDNN and zlib;
* buffers up to 32 MiB kept for reuse (``mallopt(M_MMAP_THRESHOLD)``, and ``M_TRIM_THRESHOLD`` twice
  that): the state glibc's sliding thresholds reach by themselves once a large mapped buffer has been
  freed, made fixed from the start. Without it the service's speed depended on which engine allocated
  first: with the int8 graphs on ONNX Runtime the thresholds stayed low, freed buffers went back to
  the kernel and came back as fresh zeroed pages, and the face detector's memory-bound steps (the
  pyramid's running sums, copies) took twice as long (``bench/request.py``: detect 65–79 ms in the
  server against 20–38 ms kept; a request 0.46–0.49× the TensorFlow pass against 0.42–0.46×), for
  2–3 % more peak memory under decompression bombs (``bench/soak.py --bombs``); the trims below
  still give the kept memory back;
* ``malloc_trim(0)`` once the device's worker has finished no work for a whole look (5 s) after
  working, and at least every 30 s while it works without such a pause (under steady load it never
  pauses, and the arenas' high-water mark would ratchet up with each mix of large requests) —
  returns the free pages of every arena to the system, in a few milliseconds. The pages it returns
  are faulted in again by the requests after it: with one client sending photo after photo, a trim
  at whichever look found the worker idle for an instant (as before) was followed by 500–3,700 page
  faults per request and face detection spikes of 30–60 ms, where without it requests faulted 0–10.

On other platforms or C libraries all three are no-ops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Final

log = logging.getLogger(__name__)

#: glibc's mallopt parameter numbers (malloc.h): the arena limit, the size from which a buffer is
#: mapped on its own (and unmapped when freed), the free top of the heap kept before it is given back.
_M_ARENA_MAX: Final = -8
_M_MMAP_THRESHOLD: Final = -3
_M_TRIM_THRESHOLD: Final = -1
#: The largest mmap threshold glibc takes on 64-bit (its sliding threshold stops there too).
MAX_MMAP_THRESHOLD_MIB: Final = 32

#: Seconds between trims while the worker works without a pause.
TRIM_BUSY_EVERY_S: Final = 30.0


@dataclass
class TrimPolicy:
    """When to give memory back, asked at each look: once the worker is idle and has finished nothing
    since the previous look (a pause, not an instant between two requests) after work, or when it
    has worked for ``busy_every_s`` since the last trim; never twice without work in between."""

    last_trim: float
    busy_every_s: float = TRIM_BUSY_EVERY_S
    #: Batches done at the last trim, and at the previous look (at first, the same).
    seen: int = 0
    looked: int = field(init=False)

    def __post_init__(self) -> None:
        self.looked = self.seen

    def due(self, now: float, idle: bool, batches_done: int) -> bool:
        paused = idle and batches_done == self.looked
        self.looked = batches_done
        if batches_done == self.seen:
            return False
        if paused or now - self.last_trim >= self.busy_every_s:
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


def keep_buffers(mib: int) -> bool:
    """Serve buffers under ``mib`` MiB from the arenas, reused after they are freed, and keep up to
    twice that free at the top of a heap between trims (call early, as :func:`limit_arenas`); False
    where unsupported. 0 leaves glibc's sliding thresholds."""
    libc = _libc()
    if libc is None or mib <= 0:
        return False
    size = min(mib, MAX_MMAP_THRESHOLD_MIB) << 20
    ok = bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(size)))
    ok = ok and bool(libc.mallopt(ctypes.c_int(_M_TRIM_THRESHOLD), ctypes.c_int(2 * size)))
    if ok:
        log.debug("malloc keeps buffers under %d MiB for reuse", mib)
    return ok


def trim() -> bool:
    """Return the free memory of every malloc arena to the system; False where unsupported."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.malloc_trim(ctypes.c_size_t(0)))
