"""Start-time fair queuing: clients served in turn by estimated seconds, places kept while decoding."""

from __future__ import annotations

from serving.fair_queue import FairQueue


def _drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while (item := queue.pop()) is not None:
        out.append(item)
    return out


def test_a_flood_only_pushes_its_own_client_back() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(10):
        queue.push("flood", 1.0, f"f{i}")
    assert queue.pop() == "f0"  # running
    queue.push("polite", 1.0, "p0")
    assert queue.pop() == "p0"  # next, not after nine more
    assert _drain(queue) == [f"f{i}" for i in range(1, 10)]


def test_busy_clients_get_equal_seconds_whatever_their_images_cost() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(12):
        queue.push("cheap", 1.0, f"c{i}")
        queue.push("dear", 2.0, f"d{i}")
    first = [queue.pop() for _ in range(9)]
    assert sum(x is not None and x.startswith("c") for x in first) == 6  # 6 s against 3 × 2 s


def test_a_held_place_keeps_its_turn_while_its_image_decodes() -> None:
    queue: FairQueue[str] = FairQueue()
    slot = queue.hold("b", 1.0)
    for i in range(3):
        queue.push("a", 1.0, f"a{i}")
    assert queue.pop() == "a0"  # b's image is not ready: it is not served, nor waited for
    queue.fill(slot, "b0")
    assert _drain(queue) == ["b0", "a1", "a2"]


def test_counts_ahead_and_drop() -> None:
    queue: FairQueue[str] = FairQueue()
    a0 = queue.push("a", 1.0, "a0")
    a1 = queue.push("a", 2.0, "a1")
    b0 = queue.hold("b", 0.5)
    assert (len(queue), queue.held, queue.places("a"), queue.places("b")) == (2, 1, 2, 1)
    assert queue.cost_s == 3.5
    assert queue.ahead(a0) == 1.0
    assert queue.ahead(b0) == 1.5  # a0 and b0 start together; b0 joined after a0
    assert queue.ahead(a1) == 3.5
    assert queue.last("a") is a1 and queue.last("c") is None
    assert queue.drop(a1) and not queue.drop(a1)
    assert queue.drop(b0)
    assert (len(queue), queue.held, queue.cost_s) == (1, 0, 1.0)
    assert queue.find("a0") is a0 and queue.find("a1") is None
    assert queue.drain() == ["a0"] and not queue


def test_a_client_back_after_a_pause_starts_at_the_present() -> None:
    """Credit does not pile up: a client idle for a long time is served next, not for ever first."""
    queue: FairQueue[str] = FairQueue()
    for i in range(5):
        queue.push("a", 1.0, f"a{i}")
    assert _drain(queue)[:1] == ["a0"]
    for i in range(5):
        queue.push("b", 1.0, f"b{i}")
        queue.push("a", 1.0, f"a{i + 5}")
    order = _drain(queue)
    # a's earlier service does not count against it now: they alternate.
    assert order[:4] in (["b0", "a5", "b1", "a6"], ["a5", "b0", "a6", "b1"])
