"""Seen before, answered at once: what the models made of recent photos, kept per client.

A person who moves the strength slider, asks for JPEG instead of PNG or for a smaller result sends
the same photo again, and only the last milliseconds of the work change: the background and head
networks would run on the same pixels at the same processing size. The request flow keeps each
photo's :class:`~inference.pipeline.Stages` (the processing image and the cartoon, uint8, before
strength and the output size: about 4 MB for a 720×960 photo) in this cache, under a
:class:`CacheKey`: the client, the SHA-256 of the uploaded bytes, the style and its weights'
version, the processing size, the device and the dtype. A request that differs only in strength,
format, quality or output size then runs only strength, the resize and the encode
(:func:`~inference.pipeline.finish_stages`), with the bytes a full run would give.

Privacy: the client is part of the key, so one client's entries never answer another's requests:
otherwise the time of an answer would tell a client whether someone else had sent that photo.
Entries are pixels of people's photos, held in this process's memory only, never written anywhere;
``TOONSERVE_RESULT_CACHE_BYTES=0`` turns the cache off.

Bounded by bytes (the pixels held), least recently used first out; an entry larger than the whole
cache is not kept. Thread-safe (the event loop and tools share it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

from inference.pipeline import Stages

#: Memory the cache holds by default: about 60 photos at the default processing size.
DEFAULT_RESULT_CACHE_BYTES: Final = 256 * 1024 * 1024


@dataclass(frozen=True)
class CacheKey:
    """What makes two requests' model work the same."""

    #: The client (:attr:`serving.tickets.Client.key`): no entry answers another client.
    client: str
    #: SHA-256 of the uploaded bytes, hex.
    photo: str
    style: str
    #: The style's weights (:attr:`inference.models.LoadedStyle.version`).
    version: str
    processing_size: int
    device: str
    dtype: str


@dataclass(frozen=True)
class CacheStats:
    """Counts since start, and what is held now."""

    hits: int
    misses: int
    evictions: int
    entries: int
    bytes: int
    capacity: int


class ResultCache:
    """An LRU of :class:`Stages` bounded by the bytes of their pixels (module docstring)."""

    def __init__(self, capacity_bytes: int = DEFAULT_RESULT_CACHE_BYTES) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be at least 0, got {capacity_bytes}")
        self.capacity = capacity_bytes
        self._entries: OrderedDict[CacheKey, Stages] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def get(self, key: CacheKey) -> Stages | None:
        """The entry (now the most recently used), or None. Not counted: the flow counts what it
        served (:meth:`count_hit`, :meth:`count_miss`), whether from an entry or from the same
        photo's work in flight."""
        with self._lock:
            stages = self._entries.get(key)
            if stages is not None:
                self._entries.move_to_end(key)
            return stages

    def count_hit(self) -> None:
        """An image finished from stages already made (the models did not run for it)."""
        with self._lock:
            self._hits += 1

    def count_miss(self) -> None:
        """An image the models ran on."""
        with self._lock:
            self._misses += 1

    def put(self, key: CacheKey, stages: Stages) -> None:
        """Keep ``stages`` under ``key``, letting the least recently used go until it fits; an entry
        larger than the whole cache is not kept."""
        size = stages.nbytes
        if size > self.capacity:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            while self._entries and self._bytes + size > self.capacity:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self._evictions += 1
            self._entries[key] = stages
            self._bytes += size

    def discard(self, key: CacheKey) -> None:
        """Forget ``key`` (its entry could not serve a request)."""
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self._hits, self._misses, self._evictions, len(self._entries), self._bytes, self.capacity
            )
