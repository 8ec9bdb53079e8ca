"""The threads that probe, decode and encode uploads, shared fairly between clients.

Decoding and encoding run beside the device worker on a few threads (``codec_threads``). Like the
worker, they are shared: with one first-come-first-served queue, a client that sends sixteen large
photos at once makes another client's small photo wait for all of their decodes and encodes before
its own, twice. So the pool keeps a line per client and its threads serve the client whose turn it
is (start-time fair queuing by megapixels of work, :class:`~serving.fair_queue.Turns`): another
client's task waits for at most the tasks already running. Within a client's line, work that
finishes a request (probing a header, encoding a result) goes before work that starts one
(decoding): it answers someone, and it lets go of a result's memory before more is decoded.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from serving.fair_queue import Turns

#: Megapixels a task counts for at least (a header probe).
_MIN_COST_MP: Final = 0.01


@dataclass(eq=False)
class _Task:
    run: Callable[[], Any]
    megapixels: float
    future: Future[Any] = field(default_factory=Future)


@dataclass
class _Line:
    """One client's waiting tasks: those that finish a request, and those that start one."""

    finishing: deque[_Task] = field(default_factory=deque)
    starting: deque[_Task] = field(default_factory=deque)

    def pop(self) -> _Task:
        return self.finishing.popleft() if self.finishing else self.starting.popleft()

    def __bool__(self) -> bool:
        return bool(self.finishing or self.starting)


class CodecPool:
    """``threads`` threads running codec work in fair shares between client keys (module docstring)."""

    def __init__(self, threads: int, name: str = "toonserve-codec") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._lines: dict[str, _Line] = {}
        self._turns = Turns()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True) for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[[], Any], *, key: str, megapixels: float, finishing: bool) -> Future[Any]:
        """Run ``fn`` in ``key``'s turn; ``megapixels``: how much work it is; ``finishing``: it probes or
        encodes (goes before decodes)."""
        task = _Task(fn, max(megapixels, _MIN_COST_MP))
        with self._cond:
            if self._closed:
                raise RuntimeError("the codec pool is shut down")
            line = self._lines.setdefault(key, _Line())
            (line.finishing if finishing else line.starting).append(task)
            self._cond.notify()
        return task.future

    def _take(self) -> _Task | None:
        with self._cond:
            while not self._lines:
                if self._closed:
                    return None
                self._cond.wait()
            # The client whose turn it is: the smallest start tag, the first to come among equals.
            key = min(self._lines, key=self._turns.start)
            line = self._lines[key]
            task = line.pop()
            if not line:
                del self._lines[key]
            self._turns.served(self._turns.book(key, task.megapixels), self._lines)
            return task

    def _loop(self) -> None:
        while (task := self._take()) is not None:
            if not task.future.set_running_or_notify_cancel():
                continue
            try:
                task.future.set_result(task.run())
            except BaseException as exc:  # handed to whoever awaits it, as an executor does
                task.future.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        """Finish what was submitted, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if wait:
            for thread in self._threads:
                thread.join()
