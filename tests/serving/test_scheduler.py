"""The per-device worker: batching across requests, bounded queue, deadlines, cancellation, drain."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from devkit import photos
from inference.errors import ToonserveError
from inference.pipeline import AbandonedError, Cartoonizer, Options, Result
from serving.cost import CostModel
from serving.scheduler import GRACE_AT_MOST, Scheduler
from serving.tickets import (
    Client,
    ClientQueueFullError,
    DeadlineExceededError,
    QueueFullError,
    SchedulerClosedError,
)


class _Recorder:
    """Stands in for a Cartoonizer: records each run_many call, optionally blocking until released.
    ``entered`` is set once the worker has begun a batch (and so holds it at the gate)."""

    def __init__(self, real: Cartoonizer, gate: threading.Event | None = None) -> None:
        self.real = real
        self.calls: list[int] = []
        self.gate = gate
        self.entered = threading.Event()

    def run_many(
        self, items: Sequence[tuple[np.ndarray, Options]], alive: Callable[[int], bool] = lambda _: True
    ) -> list[Result | ToonserveError]:
        self.calls.append(len(items))
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        return self.real.run_many(items, alive)


def _until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Whether ``condition`` came true within ``timeout`` seconds (asked every 10 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _scheduler(
    cartoonizer: Cartoonizer, gate: threading.Event | None = None, **kw: object
) -> tuple[Scheduler, _Recorder]:
    rec = _Recorder(cartoonizer, gate)
    return Scheduler({"anime": rec}, name="test", **kw), rec  # type: ignore[dict-item, arg-type]


#: Options of the tests' job items (background) and interactive requests, told apart by strength.
BG = Options(no_face="passthrough", strength=0.5)
FG = Options(no_face="passthrough")


class _Tagging(_Recorder):
    """A recorder that also notes, in ``order``, "bg" or "fg" for each image it runs (by BG / FG)."""

    def __init__(self, real: Cartoonizer, gate: threading.Event | None = None) -> None:
        super().__init__(real, gate)
        self.order: list[str] = []

    def run_many(
        self, items: Sequence[tuple[np.ndarray, Options]], alive: Callable[[int], bool] = lambda _: True
    ) -> list[Result | ToonserveError]:
        self.order.extend("bg" if options == BG else "fg" for _, options in items)
        return super().run_many(items, alive)


@pytest.mark.slow
def test_concurrent_requests_share_a_batch(cartoonizer: Cartoonizer) -> None:
    sched, rec = _scheduler(cartoonizer, max_batch=4, batch_wait=0.5)
    img = photos.astronaut()
    tickets = [sched.submit("anime", img, Options(), time.monotonic() + 60) for _ in range(3)]
    sched.start()
    results = [t.future.result(60) for t in tickets]
    sched.close()
    assert rec.calls == [3]
    assert all(r.faces_stylized == 1 for r in results)
    assert sched.cost.measurements == 1  # one batch of three: one measurement, per image


def test_full_queue_refuses_with_retry_after(cartoonizer: Cartoonizer) -> None:
    sched, _ = _scheduler(cartoonizer, queue_size=2)
    img = np.zeros((16, 16, 3), np.uint8)
    for _ in range(2):
        sched.submit("anime", img, Options(), time.monotonic() + 60)
    with pytest.raises(QueueFullError) as info:
        sched.submit("anime", img, Options(), time.monotonic() + 60)
    assert info.value.retry_after >= 1
    assert "0 free of 2" in str(info.value)
    sched.close(drain=False)


def test_expired_and_cancelled_tickets_are_dropped(cartoonizer: Cartoonizer) -> None:
    sched, rec = _scheduler(cartoonizer)
    img = photos.coffee()
    expired = sched.submit("anime", img, Options(), time.monotonic() - 1)
    gone = sched.submit("anime", img, Options(), time.monotonic() + 60)
    gone.cancel()
    kept = sched.submit("anime", img, Options(), time.monotonic() + 60)
    sched.start()
    assert kept.future.result(60).no_face == "background"
    with pytest.raises(DeadlineExceededError):
        expired.future.result(1)
    with pytest.raises(AbandonedError):
        gone.future.result(1)
    assert rec.calls == [1]  # only the live ticket reached the pipeline
    sched.close()


def test_close_drains_accepted_work_then_refuses(cartoonizer: Cartoonizer) -> None:
    gate = threading.Event()
    sched, _ = _scheduler(cartoonizer, gate=gate, max_batch=1)
    img = photos.coffee()
    sched.start()
    first = sched.submit("anime", img, Options(no_face="passthrough"), time.monotonic() + 60)
    second = sched.submit("anime", img, Options(no_face="passthrough"), time.monotonic() + 60)
    closer = threading.Thread(target=sched.close)
    closer.start()
    # Refused once close has begun (on its thread); what was accepted before that is drained with the rest.
    accepted = [first, second]
    deadline = time.monotonic() + 30
    while True:
        try:
            accepted.append(sched.submit("anime", img, Options(no_face="passthrough"), time.monotonic() + 60))
        except SchedulerClosedError:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    gate.set()
    closer.join(30)
    assert not closer.is_alive()
    assert all(t.future.result(1).no_face == "passthrough" for t in accepted)


def test_a_failing_batch_does_not_kill_the_worker(cartoonizer: Cartoonizer) -> None:
    class Boom(_Recorder):
        def run_many(self, items, alive=lambda _: True):  # type: ignore[no-untyped-def]
            self.calls.append(len(items))
            if len(self.calls) == 1:
                raise RuntimeError("bug")
            return self.real.run_many(items, alive)

    rec = Boom(cartoonizer)
    sched = Scheduler({"anime": rec}, max_batch=1, name="test")  # type: ignore[dict-item]
    sched.start()
    img = photos.coffee()
    bad = sched.submit("anime", img, Options(), time.monotonic() + 60)
    with pytest.raises(RuntimeError):
        bad.future.result(30)
    good = sched.submit("anime", img, Options(no_face="passthrough"), time.monotonic() + 60)
    assert good.future.result(30).no_face == "passthrough"
    sched.close()


def test_interactive_work_goes_before_background_work(cartoonizer: Cartoonizer) -> None:
    """Job items (background) wait while interactive tickets are queued, and never fill the
    interactive queue."""
    gate = threading.Event()
    rec = _Tagging(cartoonizer, gate)
    sched = Scheduler({"anime": rec}, queue_size=2, max_batch=1, name="test")  # type: ignore[dict-item]
    img = photos.coffee()
    first = sched.submit("anime", img, BG, time.monotonic() + 60, background=True)
    sched.start()
    assert rec.entered.wait(30)  # the worker holds the first background ticket at the gate
    background = [sched.submit("anime", img, BG, float("inf"), background=True) for _ in range(5)]
    interactive = [sched.submit("anime", img, FG, time.monotonic() + 60) for _ in range(2)]
    assert sched.depth == 2 and sched.background_depth == 5  # background work is not counted
    gate.set()
    for t in [first, *background, *interactive]:
        t.future.result(60)
    sched.close()
    assert rec.order == ["bg", "fg", "fg", "bg", "bg", "bg", "bg", "bg"]


@pytest.mark.parametrize(("grace", "expected"), [(1.0, ["fg", "fg", "bg"]), (0.0, ["fg", "bg", "fg"])])
def test_background_work_waits_a_moment_for_the_next_interactive_request(
    cartoonizer: Cartoonizer, grace: float, expected: list[str]
) -> None:
    """A client just served sends its next photo at once: within the grace it goes before the job
    item queued ahead of it (without one, it waits for the whole item). With no next request, the
    item starts once the grace is over."""
    rec = _Tagging(cartoonizer)
    sched = Scheduler({"anime": rec}, max_batch=1, name="test", interactive_grace=grace)  # type: ignore[dict-item]
    img = photos.coffee()
    sched.start()
    sched.submit("anime", img, FG, time.monotonic() + 60).future.result(60)
    item = sched.submit("anime", img, BG, float("inf"), background=True)
    # The next request: admitted (then decoding), submitted a moment later: 0.1 s, well within a
    # grace of 1 s; without a grace, once the item has started (however slow this machine).
    admission = sched.admit([img.shape[0] * img.shape[1]], time.monotonic() + 60)
    if grace:
        time.sleep(0.1)
    else:
        assert _until(lambda: "bg" in rec.order)
    nxt = sched.submit("anime", img, FG, time.monotonic() + 60, admission=admission)
    nxt.future.result(60)
    item.future.result(60)
    assert rec.order == expected
    alone = sched.submit("anime", img, BG, float("inf"), background=True)
    alone.future.result(60)
    assert rec.order[-1] == "bg"
    sched.close()


@pytest.mark.slow
def test_a_client_sending_back_to_back_does_not_starve_jobs(cartoonizer: Cartoonizer) -> None:
    """The grace holds a waiting job item back for GRACE_AT_MOST interactive batches in a row, then the
    item goes before the next request (which was not queued yet)."""
    rec = _Tagging(cartoonizer)
    sched = Scheduler({"anime": rec}, max_batch=1, name="test", interactive_grace=1.0)  # type: ignore[dict-item]
    img = photos.coffee()
    sched.start()
    sched.submit("anime", img, FG, time.monotonic() + 60).future.result(60)
    item = sched.submit("anime", img, BG, float("inf"), background=True)
    for _ in range(GRACE_AT_MOST + 1):
        admission = sched.admit([img.shape[0] * img.shape[1]], time.monotonic() + 60)
        time.sleep(0.1)  # decoding, well within the grace
        sched.submit("anime", img, FG, time.monotonic() + 60, admission=admission).future.result(60)
    item.future.result(60)
    sched.close()
    assert rec.order == ["fg"] * (GRACE_AT_MOST + 1) + ["bg", "fg"]


class _Named(_Recorder):
    """A recorder that notes, in ``order``, the name its options' strength stands for."""

    def __init__(
        self, real: Cartoonizer, names: dict[float, str], gate: threading.Event | None = None
    ) -> None:
        super().__init__(real, gate)
        self.names = names
        self.order: list[str] = []

    def run_many(
        self, items: Sequence[tuple[np.ndarray, Options]], alive: Callable[[int], bool] = lambda _: True
    ) -> list[Result | ToonserveError]:
        self.order.extend(self.names[options.strength] for _, options in items)
        return super().run_many(items, alive)


FLOOD, POLITE = Client("flood", "flood"), Client("polite", "polite")
AS_FLOOD, AS_POLITE = (
    Options(no_face="passthrough", strength=0.3),
    Options(no_face="passthrough", strength=0.7),
)


@pytest.mark.parametrize("background", [False, True])
def test_a_flooding_client_does_not_starve_another(cartoonizer: Cartoonizer, background: bool) -> None:
    """One client's 8 queued images delay another's by the work already running, not by all 8; job
    items (background) share the same way between their clients."""
    gate = threading.Event()
    rec = _Named(cartoonizer, {0.3: "flood", 0.7: "polite"}, gate)
    sched = Scheduler({"anime": rec}, queue_size=16, max_batch=1, name="test")  # type: ignore[dict-item]
    img = np.zeros((64, 64, 3), np.uint8)
    deadline = float("inf") if background else time.monotonic() + 60
    flood = [
        sched.submit("anime", img, AS_FLOOD, deadline, background=background, client=FLOOD) for _ in range(8)
    ]
    sched.start()
    assert rec.entered.wait(30)  # the first flood image is running, held at the gate
    polite = sched.submit("anime", img, AS_POLITE, deadline, background=background, client=POLITE)
    gate.set()
    for t in [*flood, polite]:
        t.future.result(60)
    sched.close()
    assert rec.order.index("polite") == 1


def test_a_client_over_its_share_gets_its_own_refusal_and_others_still_get_in(
    cartoonizer: Cartoonizer,
) -> None:
    outcomes: list[tuple[str, str]] = []
    sched = Scheduler(
        {"anime": cartoonizer},
        queue_size=8,
        name="test",
        on_outcome=lambda outcome, client: outcomes.append((outcome, client)),
    )
    greedy = Client("greedy", "greedy", max_queued=3)
    now = time.monotonic()
    sched.admit([1000, 1000], now + 60, greedy)
    sched.submit("anime", np.zeros((8, 8, 3), np.uint8), Options(), now + 60, client=greedy)
    with pytest.raises(ClientQueueFullError) as info:
        sched.admit([1000], now + 60, greedy)
    assert info.value.limit == 3 and info.value.retry_after >= 1
    assert "at most 3" in str(info.value)
    assert outcomes == [("rejected", "greedy")]
    other = sched.admit([1000] * 5, now + 60, Client("other", "other", max_queued=5))
    assert len(other.slots) == 5
    with pytest.raises(QueueFullError, match="not fit the queue") as full:
        sched.admit([1000], now + 60, Client("third", "third"))
    assert not isinstance(full.value, ClientQueueFullError)
    sched.close(drain=False)


def test_an_idle_worker_never_refuses_for_lack_of_time(cartoonizer: Cartoonizer) -> None:
    """With nothing ahead, an image is admitted even if its estimate exceeds its deadline (the
    estimate may be wrong; its deadline is enforced while it runs). With work ahead, it is not."""
    slow = CostModel(per_image_s=0.0, per_pixel_s=1e-3)  # a thousand seconds per megapixel
    sched = Scheduler({"anime": cartoonizer}, queue_size=8, name="test", cost=slow)
    now = time.monotonic()
    first = sched.admit([10_000], now + 1)  # 10 s estimated, 1 s left: admitted all the same
    assert len(first.slots) == 1
    with pytest.raises(QueueFullError, match="before its deadline"):
        sched.admit([10_000], now + 1, Client("b", "b"))
    sched.release(first)
    assert len(sched.admit([10_000], now + 1).slots) == 1
    sched.close(drain=False)


def test_the_worker_teaches_the_cost_model(cartoonizer: Cartoonizer) -> None:
    model = CostModel()
    sched = Scheduler({"anime": cartoonizer}, max_batch=1, name="test", cost=model)
    sched.start()
    before = model.estimate
    for side in (16, 300, 16, 300):
        img = np.zeros((side, side, 3), np.uint8)
        sched.submit("anime", img, Options(no_face="passthrough"), time.monotonic() + 60).future.result(60)
    sched.close()
    assert model.estimate != before
    assert model.measurements == 4
