"""The Redis job store across instances (as several replicas use it): leases and takeovers, a late
finisher, idempotency and the quota decided once for all, and Redis going away."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from devkit.redis_server import RedisServer
from devkit.serve import free_port
from jobs.errors import JobStoreError, StorageQuotaError
from jobs.redis import RedisJobStore, redacted
from tests.jobs.test_store import OPTIONS, QUOTA, TTL, _create, _uploads

LEASE = 1.0


def _pair(tmp_path: Path, server: RedisServer, lease: float = LEASE) -> tuple[RedisJobStore, RedisJobStore]:
    """Two stores on one Redis and one data directory: two replicas."""
    data = tmp_path / "data"
    return (
        RedisJobStore(data, server.url, lease_s=lease, replica="a"),
        RedisJobStore(data, server.url, lease_s=lease, replica="b"),
    )


@pytest.mark.live
def test_a_lease_not_renewed_is_taken_over(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _pair(tmp_path, redis_server)
    _create(a, "1" * 32, 10)
    held = a.claim({"anime"}, "runner-a")
    assert held is not None
    assert b.claim({"anime"}, "runner-b") is None  # held, within its lease
    time.sleep(LEASE * 0.6)
    assert a.renew(held)  # renewed: the lease starts again
    time.sleep(LEASE * 0.6)
    assert b.claim({"anime"}, "runner-b") is None
    time.sleep(LEASE + 0.1)  # runner-a died: no renewal
    taken = b.claim({"anime"}, "runner-b")
    assert taken is not None and (taken.job_id, taken.index) == (held.job_id, held.index)
    assert not a.renew(held) and b.renew(taken)
    job = b.get(held.job_id)
    assert job is not None and job.status == "running" and job.items[0].status == "running"
    assert b.waiting() == 0


@pytest.mark.live
def test_a_late_finisher_after_a_takeover_changes_nothing(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _pair(tmp_path, redis_server)
    _create(a, "2" * 32, 10, 10)
    held = a.claim({"anime"}, "runner-a")
    assert held is not None and held.index == 0
    time.sleep(LEASE + 0.1)
    taken = b.claim({"anime"}, "runner-b")
    assert taken is not None and taken.index == 0

    # The old holder wakes up before the new one is done: nothing of its outcome is recorded.
    for status in ("error", "cancelled"):
        job = a.finish(held, status, error={"code": "x", "message": "late"}, ttl_s=TTL)
        assert job is not None and job.items[0].status == "running" and job.done == 0
    job = a.finish(held, "ok", result=b"from a", ttl_s=TTL)
    assert job is not None and job.items[0].status == "running"
    result = b.result_path(held.job_id, 0, "png")
    assert not result.exists()  # a runner that lost its lease does not write
    assert a.files.input_path(held.job_id, 0).exists()  # nor take the photo from the new holder
    usage = b.usage()

    job = b.finish(taken, "ok", result=b"from b", faces_stylized=1, ttl_s=TTL)
    assert job is not None and job.items[0].status == "ok" and job.items[0].result_bytes == 6
    after = b.usage()
    assert after == usage - 10 - 1000 + 6

    # ...and after it: the item has ended; the same holds.
    job = a.finish(held, "ok", result=b"from a, later", ttl_s=TTL)
    assert job is not None and job.items[0].status == "ok" and job.items[0].result_bytes == 6
    assert result.read_bytes() == b"from b" and b.usage() == after and job.done == 1
    assert sorted(p.name for p in result.parent.iterdir()) == ["0000.png"]  # no temporary files left
    assert not a.renew(held)
    a.release(held)  # a late release changes nothing either
    assert b.waiting() == 1 and b.get(held.job_id).items[0].status == "ok"  # type: ignore[union-attr]


@pytest.mark.live
def test_two_writers_of_one_result_leave_one_file(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _pair(tmp_path, redis_server, lease=60.0)
    _create(a, "3" * 32, 10)
    claim = a.claim({"anime"}, "runner-a")
    assert claim is not None
    # Two runners finishing the same item at once (a takeover racing the old holder): the result is
    # written atomically under its final name by both; one record wins.
    same = bytes(range(256)) * 4096
    barrier = threading.Barrier(2)
    jobs = []

    def finish(store: RedisJobStore) -> None:
        barrier.wait()
        jobs.append(store.finish(claim, "ok", result=same, ttl_s=TTL))

    threads = [threading.Thread(target=finish, args=(s,)) for s in (a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    path = a.result_path(claim.job_id, 0, "png")
    assert path.read_bytes() == same and sorted(p.name for p in path.parent.iterdir()) == ["0000.png"]
    job = a.get(claim.job_id)
    assert job is not None and job.status == "succeeded" and job.done == 1
    assert a.usage() == len(same)


@pytest.mark.live
def test_concurrent_idempotent_submissions_on_two_replicas_make_one_job(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = _pair(tmp_path, redis_server)
    ids: list[str] = []
    barrier = threading.Barrier(6)

    def submit(store: RedisJobStore, n: int) -> None:
        barrier.wait()
        job, _ = store.create(
            f"{n:032x}",
            OPTIONS,
            _uploads(50, 60),
            webhook=None,
            idempotency_key="one upload",
            ttl_s=TTL,
            quota_bytes=QUOTA,
        )
        ids.append(job.id)

    threads = [threading.Thread(target=submit, args=((a, b)[n % 2], n)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(ids) == 6 and len(set(ids)) == 1
    assert [j.id for j in a.recent(None, 10)] == ids[:1] == [j.id for j in b.recent(None, 10)]
    assert sorted(p.name for p in a.files.jobs_dir.iterdir()) == ids[:1]
    assert a.usage() == 50 + 60 + 2 * 1000 and b.waiting() == 2


@pytest.mark.live
def test_the_quota_holds_across_replicas(tmp_path: Path, redis_server: RedisServer) -> None:
    a, b = _pair(tmp_path, redis_server)
    quota = 2500  # one job of two 100-byte photos (2 × (100 + 1000) bytes) fits; two do not
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def submit(store: RedisJobStore, n: int) -> None:
        barrier.wait()
        try:
            store.create(
                f"{n:032x}", OPTIONS, _uploads(100, 100), webhook=None, idempotency_key=None, ttl_s=TTL,
                quota_bytes=quota,
            )  # fmt: skip
            outcomes.append("created")
        except StorageQuotaError:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit, args=((a, b)[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["created", "refused", "refused", "refused"]
    assert a.usage() == 2200 and len(list(a.files.jobs_dir.iterdir())) == 1

    # Results count at their real size once written: room frees up for the next job, on either.
    (job,) = b.recent(None, 1)
    for _ in range(2):
        claim = b.claim({"anime"}, "runner-b")
        assert claim is not None
        b.finish(claim, "ok", result=b"r" * 50, ttl_s=TTL)
    assert a.usage() == 100
    a.create(
        "f" * 32,
        OPTIONS,
        _uploads(100, 100),
        webhook=None,
        idempotency_key=None,
        ttl_s=TTL,
        quota_bytes=quota,
    )
    with pytest.raises(StorageQuotaError):
        b.create(
            "e" * 32, OPTIONS, _uploads(100), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=quota
        )
    assert b.delete(job.id) and a.usage() == 2200


@pytest.mark.live
def test_a_job_cancelled_while_its_runner_died_ends_at_the_takeover(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = _pair(tmp_path, redis_server)
    _create(a, "4" * 32, 10, 10)
    held = a.claim({"anime"}, "runner-a")
    assert held is not None
    job = b.cancel(held.job_id, ttl_s=TTL)
    assert job is not None and job.status == "cancelled" and job.done == 1  # the running one is left
    time.sleep(LEASE + 0.1)  # runner-a died before stopping it
    assert b.claim({"anime"}, "runner-b") is None
    job = b.get(held.job_id)
    assert job is not None and [i.status for i in job.items] == ["cancelled", "cancelled"] and job.done == 2
    assert not b.files.input_path(held.job_id, 0).exists() and b.usage() == 0


@pytest.mark.live
def test_fail_ends_running_items_and_their_holders_lose_them(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    a, b = _pair(tmp_path, redis_server, lease=60.0)
    _create(a, "5" * 32, 10, 10)
    held = a.claim({"anime"}, "runner-a")
    assert held is not None
    job = b.fail(held.job_id, "style 'anime' is not configured", ttl_s=TTL)
    assert job is not None and job.status == "failed" and [i.status for i in job.items] == ["error", "error"]
    assert not a.renew(held)
    job = a.finish(held, "ok", result=b"late", ttl_s=TTL)
    assert job is not None and job.items[0].status == "error" and b.usage() == 0 and b.waiting() == 0


@pytest.mark.live
def test_redis_going_away_is_a_job_store_error_and_coming_back_works(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    store = RedisJobStore(tmp_path / "data", redis_server.url, lease_s=60.0)
    _create(store, "6" * 32, 10)
    redis_server.kill()
    for call in (lambda: store.get("6" * 32), lambda: store.claim({"anime"}, "me"), store.usage):
        with pytest.raises(JobStoreError, match=r"Redis at redis://127\.0\.0\.1:\d+/0 cannot be reached"):
            call()
    with pytest.raises(JobStoreError):  # refused before any photo is written
        store.create(
            "7" * 32, OPTIONS, _uploads(10), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=QUOTA
        )
    assert list(store.files.jobs_dir.iterdir()) == [store.files.jobs_dir / ("6" * 32)]
    redis_server.start()  # the same port, empty (no persistence in this test)
    assert store.get("6" * 32) is None and store.usage() == 0
    _create(store, "8" * 32, 10)
    assert store.claim({"anime"}, "me") is not None
    assert store.get("7" * 32) is None and store.waiting() == 0


def test_an_unreachable_redis_is_a_clear_error(tmp_path: Path) -> None:
    store = RedisJobStore(tmp_path / "data", f"redis://:s3cret@127.0.0.1:{free_port()}/0", lease_s=60.0)
    with pytest.raises(JobStoreError, match="cannot be reached") as info:
        store.waiting()
    assert "s3cret" not in str(info.value) and ":***@127.0.0.1:" in str(info.value)
    assert redacted("redis://user:pw@host:6380/1") == "redis://user:***@host:6380/1"
    assert redacted("redis://host/0") == "redis://host/0"
    assert redacted("rediss://:pw@[::1]:6379/0") == "rediss://:***@[::1]:6379/0"
