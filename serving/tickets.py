"""What goes through a device's worker: a :class:`Ticket` per image, for a :class:`Client`, in the places
an :class:`Admission` holds; and the errors of getting one in (a full queue, a client's full share,
a deadline, a worker shutting down)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Final, Protocol

import numpy as np
from torch import Tensor

from inference.errors import ToonserveError
from inference.pipeline import Options, Result
from serving.cost import cost_pixels
from serving.fair_queue import Slot

#: The client of work submitted without one (the CLI, benchmarks, tests).
ANONYMOUS: Final = "anonymous"


class QueueFullError(ToonserveError):
    """Too many requests are waiting; ``retry_after`` (seconds) says when to come back."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after: int = retry_after


class ClientQueueFullError(QueueFullError):
    """This client already has ``limit`` images waiting; ``retry_after`` says when some are done."""

    def __init__(self, message: str, retry_after: int, limit: int) -> None:
        super().__init__(message, retry_after)
        self.limit = limit


class DeadlineExceededError(ToonserveError):
    """The request's deadline passed before its image was finished."""


class SchedulerClosedError(ToonserveError):
    """The scheduler is shutting down and takes no new work."""


@dataclass(frozen=True)
class Client:
    """Whom a ticket is for. Fair shares and the per-client limit are kept by ``key``; ``name`` is
    what metrics and logs call it (an API key's name, or ``anonymous``: never an address)."""

    name: str = ANONYMOUS
    #: Who shares a line: the name, or (clients without keys) their address.
    key: str = ANONYMOUS
    #: Images this client may have waiting or admitted at once; None: only the queue's limit.
    max_queued: int | None = None


@dataclass(eq=False)
class Admission:
    """Places held in its client's line for images a request is decoding, to be submitted with it
    (or released)."""

    #: One place per image not submitted yet, in the order they will be submitted.
    slots: list[Slot[Ticket]]
    deadline: float
    client: Client


class Cancellable(Protocol):
    """Work in flight that its owner can stop: a :class:`Ticket`, or an image waiting for the same
    photo's work in flight (:mod:`serving.flow`)."""

    def cancel(self) -> None: ...


@dataclass(eq=False)
class Ticket:
    """One image waiting for, or going through, the worker."""

    style: str
    #: (H, W, 3) uint8 RGB: a host array, or a tensor already on the device (GPU decode).
    image: np.ndarray | Tensor
    options: Options
    deadline: float  # time.monotonic() seconds
    client: Client = field(default_factory=Client)
    future: Future[Result] = field(default_factory=Future)
    enqueued: float = field(default_factory=time.monotonic)
    started: float | None = None
    #: The worker seconds it was estimated at when it joined the line.
    cost_s: float = 0.0
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _expired: threading.Event = field(default_factory=threading.Event)

    @property
    def pixels(self) -> int:
        """Its cost pixels: the processing image's area as the background pass pads it."""
        size = self.options.input_size or (int(self.image.shape[0]), int(self.image.shape[1]))
        return cost_pixels(*self.options.processing_shape(size))

    def cancel(self) -> None:
        """The client is gone: drop the work (now if queued, between stages if running)."""
        self._cancelled.set()

    def expire(self) -> None:
        """Its waiter gave up at the deadline: drop the work, counted as ``deadline``."""
        self._expired.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def expired(self, now: float | None = None) -> bool:
        return self._expired.is_set() or (now if now is not None else time.monotonic()) >= self.deadline

    @property
    def queue_wait_ms(self) -> float:
        end = self.started if self.started is not None else time.monotonic()
        return (end - self.enqueued) * 1000
