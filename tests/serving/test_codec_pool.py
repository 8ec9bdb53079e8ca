"""The codec threads: shared between clients in fair shares, a request's finishing work first."""

from __future__ import annotations

import functools
import threading
import time

import pytest

from serving.codec_pool import CodecPool


def _hold(pool: CodecPool, gate: threading.Event, key: str) -> None:
    """Occupy the pool's one worker with a task of ``key`` until ``gate`` opens: returns once it runs."""
    running = threading.Event()

    def held() -> None:
        running.set()
        gate.wait(30)

    pool.submit(held, key=key, megapixels=1, finishing=False)
    assert running.wait(30)


def test_a_client_with_many_tasks_does_not_hold_back_another() -> None:
    pool = CodecPool(1)
    gate = threading.Event()
    order: list[str] = []
    _hold(pool, gate, "flood")
    futures = [
        pool.submit(functools.partial(order.append, f"f{i}"), key="flood", megapixels=1, finishing=False)
        for i in range(5)
    ]
    futures.append(pool.submit(lambda: order.append("p"), key="polite", megapixels=1, finishing=False))
    gate.set()
    for f in futures:
        f.result(10)
    pool.shutdown()
    assert order.index("p") <= 1  # after at most one more of the flood's tasks, not all five


def test_within_a_client_finishing_work_goes_first() -> None:
    pool = CodecPool(1)
    gate = threading.Event()
    order: list[str] = []
    _hold(pool, gate, "a")
    decodes = [
        pool.submit(functools.partial(order.append, f"decode{i}"), key="a", megapixels=1, finishing=False)
        for i in range(2)
    ]
    encode = pool.submit(lambda: order.append("encode"), key="a", megapixels=1, finishing=True)
    gate.set()
    for f in [*decodes, encode]:
        f.result(10)
    pool.shutdown()
    assert order == ["encode", "decode0", "decode1"]


def test_errors_reach_the_caller_and_shutdown_finishes_what_was_submitted() -> None:
    pool = CodecPool(2)

    def boom() -> None:
        raise ValueError("bad")

    failing = pool.submit(boom, key="a", megapixels=0, finishing=True)

    def nap() -> str:
        time.sleep(0.1)
        return "done"

    slow = pool.submit(nap, key="b", megapixels=0, finishing=False)
    with pytest.raises(ValueError, match="bad"):
        failing.result(10)
    pool.shutdown(wait=True)
    assert slow.result(0) == "done"
    with pytest.raises(RuntimeError, match="shut down"):
        pool.submit(lambda: None, key="a", megapixels=0, finishing=False)
    with pytest.raises(ValueError):
        CodecPool(0)
