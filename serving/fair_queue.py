"""Fair shares of one worker between clients: start-time fair queuing by estimated cost.

Each client (a key: an API key's name, or an address) has its own line. An image that joins a line
gets a *start tag*: the later of the queue's virtual time and the finish tag of the same client's
previous image; its finish tag is its start plus its estimated seconds. The worker always takes the
image with the smallest start tag, and the virtual time becomes that tag (Goyal, Vin and Cheng 1996,
"Start-time fair queueing"). So a client that floods only pushes its own images further back: a
client that was idle starts at the virtual time and is served next, after what is already running;
clients that both keep the worker busy get equal seconds of it, whatever their images cost.

A place in line is taken at admission, before the image is decoded (:meth:`FairQueue.hold`), and
filled with its ticket once it is ready (:meth:`FairQueue.fill`): the order is fixed when the client
asked, and the decoding time does not cost it its turn. Only filled places are served.
"""

from __future__ import annotations

import itertools
from collections.abc import Container, Iterator
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

T = TypeVar("T")

#: Least seconds an image counts for, so that a line's tags always move on.
_MIN_COST_S: Final = 1e-4


@dataclass(eq=False)
class Slot(Generic[T]):
    """A place in a client's line: held for an image being decoded, then filled with its ticket."""

    key: str
    start: float
    seq: int
    cost_s: float
    item: T | None = None

    @property
    def order(self) -> tuple[float, int]:
        return self.start, self.seq


class Turns:
    """Whose turn it is, without the items: the start and finish tags of start-time fair queuing.
    :class:`FairQueue` keeps its lines with it; a job store that picks the next client's item itself
    uses it alone."""

    def __init__(self) -> None:
        #: Finish tag of each client's last booking (kept while it is ahead of the virtual time).
        self._finish: dict[str, float] = {}
        self.vtime = 0.0

    def start(self, key: str) -> float:
        """The start tag ``key``'s next booking would get."""
        return max(self.vtime, self._finish.get(key, 0.0))

    def book(self, key: str, cost: float) -> float:
        """Book ``cost`` for ``key``: its start tag."""
        start = self.start(key)
        self._finish[key] = start + max(cost, _MIN_COST_S)
        return start

    def served(self, start: float, waiting: Container[str] = ()) -> None:
        """A booking that started at ``start`` is being served: the virtual time moves there. Clients
        not ``waiting`` whose tags it has passed start afresh (credit does not pile up)."""
        self.vtime = max(self.vtime, start)
        for key in [k for k, f in self._finish.items() if f <= self.vtime and k not in waiting]:
            del self._finish[key]

    def clear(self) -> None:
        self._finish.clear()


class FairQueue(Generic[T]):
    """The lines of every client (module docstring). Not thread-safe: the scheduler holds its lock."""

    def __init__(self) -> None:
        self._lines: dict[str, list[Slot[T]]] = {}
        self._turns = Turns()
        self._seq = itertools.count()
        #: Filled places (items waiting for the worker) and held ones (being decoded).
        self.queued = 0
        self.held = 0
        #: Estimated seconds of every place, held or filled.
        self.cost_s = 0.0

    def __len__(self) -> int:
        return self.queued

    def __bool__(self) -> bool:
        return self.queued > 0

    def __iter__(self) -> Iterator[T]:
        """The waiting items, in no particular order."""
        return (s.item for line in self._lines.values() for s in line if s.item is not None)

    def places(self, key: str) -> int:
        """Places ``key`` holds, filled or not."""
        return len(self._lines.get(key, ()))

    def last(self, key: str) -> Slot[T] | None:
        """``key``'s last place in line, if it holds any."""
        line = self._lines.get(key)
        return line[-1] if line else None

    def hold(self, key: str, cost_s: float) -> Slot[T]:
        """A place at the end of ``key``'s line for an image of ``cost_s`` estimated seconds."""
        cost_s = max(cost_s, _MIN_COST_S)
        slot: Slot[T] = Slot(key, self._turns.book(key, cost_s), next(self._seq), cost_s)
        self._lines.setdefault(key, []).append(slot)
        self.held += 1
        self.cost_s += cost_s
        return slot

    def fill(self, slot: Slot[T], item: T) -> None:
        """The image of a held place is ready: it can be served."""
        if slot.item is not None:
            raise ValueError("that place is filled already")
        slot.item = item
        self.held -= 1
        self.queued += 1

    def push(self, key: str, cost_s: float, item: T) -> Slot[T]:
        """:meth:`hold` and :meth:`fill` at once."""
        slot = self.hold(key, cost_s)
        self.fill(slot, item)
        return slot

    def drop(self, slot: Slot[T]) -> bool:
        """Give a place up (a held one whose image was not submitted, a filled one whose waiter went
        away); False when it is no longer in line."""
        line = self._lines.get(slot.key)
        if line is None or not any(s is slot for s in line):
            return False
        line.remove(slot)
        if not line:
            del self._lines[slot.key]
        if slot.item is None:
            self.held -= 1
        else:
            self.queued -= 1
        self.cost_s -= slot.cost_s
        return True

    def find(self, item: T) -> Slot[T] | None:
        for line in self._lines.values():
            for slot in line:
                if slot.item is item:
                    return slot
        return None

    def pop(self) -> T | None:
        """The waiting item with the smallest start tag, out of line; None when none waits."""
        best: Slot[T] | None = None
        for line in self._lines.values():
            first = next((s for s in line if s.item is not None), None)
            if first is not None and (best is None or first.order < best.order):
                best = first
        if best is None:
            return None
        self.drop(best)
        self._turns.served(best.start, self._lines)
        assert best.item is not None
        return best.item

    def ahead(self, slot: Slot[T]) -> float:
        """Estimated seconds of every place (any client, held or filled) served no later than
        ``slot``, its own included: what must run before its image is done, if nobody else comes."""
        return sum(s.cost_s for line in self._lines.values() for s in line if s.order <= slot.order)

    def drain(self) -> list[T]:
        """Every waiting item, out of line (held places are dropped too)."""
        items = list(self)
        self._lines.clear()
        self._turns.clear()
        self.queued = self.held = 0
        self.cost_s = 0.0
        return items
