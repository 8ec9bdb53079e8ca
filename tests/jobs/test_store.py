"""Both job stores (parametrized): durable acceptance, hand-out order, idempotency, quota, cancel, fail,
expiry; then what differs: the embedded store's recovery at start-up and the Redis store's.

The Redis cases start a ``redis-server`` (marked ``live``); tests/jobs/test_redis_store.py has the
Redis-only ones (leases, takeovers, several store instances at once).
"""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.redis_server import RedisServer
from jobs.errors import StorageQuotaError
from jobs.model import Job
from jobs.redis import RedisJobStore
from jobs.sqlite import SQLiteJobStore
from jobs.store import Upload
from serving.options import ResolvedOptions
from serving.tracing import TraceContext

OPTIONS = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)
TTL = 3600.0
QUOTA = 10**9

Store = SQLiteJobStore | RedisJobStore


def _uploads(*sizes: int, refused: tuple[int, ...] = ()) -> list[Upload]:
    out = []
    for i, size in enumerate(sizes):
        if i in refused:
            out.append(Upload(f"{i}.txt", None, 0, {"code": "unsupported_image", "message": "no"}, 0))
        else:
            out.append(Upload(f"{i}.jpg", io.BytesIO(bytes([i]) * size), size, None, 1000))
    return out


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.live)])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    made: Store
    if request.param == "sqlite":
        made = SQLiteJobStore(tmp_path / "data")
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        made = RedisJobStore(tmp_path / "data", server.url, lease_s=60.0, replica="test")
    yield made
    made.close()


def _create(
    store: Store, job_id: str, *sizes: int, key: str | None = None, client: str = "anonymous", **kw: object
) -> Job:
    job, created = store.create(
        job_id,
        OPTIONS,
        _uploads(*sizes, **kw),  # type: ignore[arg-type]
        webhook=None,
        idempotency_key=key,
        ttl_s=TTL,
        quota_bytes=QUOTA,
        client=client,
    )
    assert created
    return job


def test_a_job_is_stored_with_its_photos_and_handed_out_in_order(store: Store) -> None:
    _create(store, "a" * 32, 10, 20, 30, refused=(1,))
    job = store.get("a" * 32)
    assert job is not None and job.status == "queued"
    assert [i.status for i in job.items] == ["queued", "error", "queued"]
    assert job.items[1].error == {"code": "unsupported_image", "message": "no"}
    assert store.files.input_path(job.id, 0).read_bytes() == b"\x00" * 10
    assert not store.files.input_path(job.id, 1).exists()
    assert store.usage() == 10 + 30 + 2 * 1000 and store.waiting() == 2

    first = store.claim({"anime"}, "me")
    assert first is not None and first.index == 0
    assert store.get(job.id).status == "running"  # type: ignore[union-attr]
    assert store.claim({"3d"}, "me") is None  # the job's style cannot run here
    second = store.claim({"anime"}, "me")
    assert second is not None and second.index == 2
    assert store.claim({"anime"}, "me") is None
    assert store.waiting() == 0

    job = store.finish(first, "ok", result=b"png!", faces_stylized=1, timings_ms={"head": 1.0}, ttl_s=TTL)
    assert job is not None and job.status == "running"
    assert job.items[0].faces_stylized == 1 and job.items[0].timings_ms == {"head": 1.0}
    assert store.result_path(job.id, 0, "png").read_bytes() == b"png!"
    assert not store.files.input_path(job.id, 0).exists()  # the photo goes once its item has ended
    job = store.finish(second, "error", error={"code": "no_face", "message": "none"}, ttl_s=TTL)
    assert job is not None and job.status == "succeeded" and (job.done, job.failed) == (3, 2)
    assert job.items[2].error == {"code": "no_face", "message": "none"}
    assert store.usage() == 4
    assert job.expires_at > time.time() + TTL - 5
    assert store.counts() == {"succeeded": 1}


def test_a_job_whose_photos_were_all_refused_has_ended_at_once(store: Store) -> None:
    job = _create(store, "9" * 32, 10, refused=(0,))
    assert job.status == "succeeded" and job.done == 1 and store.waiting() == 0 and store.usage() == 0
    assert store.claim({"anime"}, "me") is None


def test_oldest_job_first_and_styles_kept_apart(store: Store) -> None:
    store.create(
        "7" * 32,
        ResolvedOptions(style="3d", processing_size=720, format="png", quality=90),
        _uploads(10),
        webhook=None,
        idempotency_key=None,
        ttl_s=TTL,
        quota_bytes=QUOTA,
    )
    time.sleep(0.01)
    _create(store, "8" * 32, 10, 10)
    assert store.active_styles() == {"3d", "anime"}
    assert store.jobs_of_style("3d") == ["7" * 32]
    assert store.claim({"anime"}, "me").job_id == "8" * 32  # type: ignore[union-attr]
    got = store.claim({"anime", "3d"}, "me")
    assert got is not None and got.job_id == "7" * 32 and got.options.style == "3d"
    assert store.claim({"anime", "3d"}, "me").index == 1  # type: ignore[union-attr]


def test_clients_take_turns_and_each_sees_its_own_jobs(store: Store) -> None:
    """A long job handed in first does not hold back another client's short one: items go to the
    clients in turn, each client's own items oldest job first."""
    _create(store, "1" * 32, *[10] * 5, client="big")
    time.sleep(0.01)
    _create(store, "2" * 32, 10, 10, client="small")
    time.sleep(0.01)
    _create(store, "3" * 32, 10, client="big")
    order = []
    while (claim := store.claim({"anime"}, "me")) is not None:
        order.append((claim.client, claim.job_id[0], claim.index))
    assert order[:4] == [("big", "1", 0), ("small", "2", 0), ("big", "1", 1), ("small", "2", 1)]
    assert order[4:] == [("big", "1", 2), ("big", "1", 3), ("big", "1", 4), ("big", "3", 0)]
    assert [j.id[0] for j in store.recent(None, 10, "big")] == ["3", "1"]
    assert [j.id[0] for j in store.recent("running", 10, "small")] == ["2"]
    assert store.recent(None, 10, "nobody") == []
    assert [j.client for j in store.recent(None, 10)] == ["big", "small", "big"]


def test_a_released_item_is_handed_out_again(store: Store) -> None:
    _create(store, "6" * 32, 10)
    claim = store.claim({"anime"}, "me")
    assert claim is not None and store.waiting() == 0
    store.release(claim)
    assert store.waiting() == 1
    job = store.get("6" * 32)
    assert job is not None and job.items[0].status == "queued"
    again = store.claim({"anime"}, "other")
    assert again is not None and again.index == 0 and again.job_id == claim.job_id


def test_idempotency_key_returns_the_first_job(store: Store) -> None:
    _create(store, "b" * 32, 10, key="k")
    again, created = store.create(
        "c" * 32, OPTIONS, _uploads(10), webhook=None, idempotency_key="k", ttl_s=TTL, quota_bytes=QUOTA
    )
    assert not created and again.id == "b" * 32
    assert store.by_idempotency_key("k").id == "b" * 32  # type: ignore[union-attr]
    assert store.get("c" * 32) is None and not store.files.job_dir("c" * 32).exists()


def test_concurrent_submissions_with_one_key_make_one_job(store: Store) -> None:
    ids: list[str] = []
    barrier = threading.Barrier(4)

    def submit(n: int) -> None:
        barrier.wait()
        job, _ = store.create(
            f"{n:032x}",
            OPTIONS,
            _uploads(50),
            webhook=None,
            idempotency_key="same",
            ttl_s=TTL,
            quota_bytes=QUOTA,
        )
        ids.append(job.id)

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1
    assert len(store.recent(None, 10)) == 1
    assert sorted(p.name for p in store.files.jobs_dir.iterdir()) == [ids[0]]
    assert store.usage() == 50 + 1000 and store.waiting() == 1


def test_quota_refuses_before_writing(store: Store) -> None:
    with pytest.raises(StorageQuotaError, match="job storage is free"):
        store.create(
            "d" * 32,
            OPTIONS,
            _uploads(600, 600),
            webhook=None,
            idempotency_key=None,
            ttl_s=TTL,
            quota_bytes=2000,
        )
    assert store.get("d" * 32) is None and list(store.files.jobs_dir.iterdir()) == []
    store.create(
        "e" * 32, OPTIONS, _uploads(100), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=2000
    )
    # 1100 reserved now: a second one of the same size no longer fits.
    with pytest.raises(StorageQuotaError):
        store.create(
            "f" * 32, OPTIONS, _uploads(100), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=2000
        )


def test_each_account_has_its_own_share(store: Store) -> None:
    def create(job_id: str, account: str, size: int) -> Job:
        job, _ = store.create(
            job_id,
            OPTIONS,
            _uploads(size),
            webhook=None,
            idempotency_key=None,
            ttl_s=TTL,
            quota_bytes=10_000,
            client=account,
            account=account,
            account_quota_bytes=4000,
        )
        return job

    create("a" * 32, "alice", 2000)  # 2000 + 1000 reserved
    with pytest.raises(StorageQuotaError, match=r"your jobs already hold .* of your .* share"):
        create("b" * 32, "alice", 500)
    assert store.usage("alice") == 3000 and store.get("b" * 32) is None
    # Another client's share is untouched by alice's.
    create("c" * 32, "bob", 2000)
    assert store.usage("bob") == 3000 and store.usage() == 6000
    # The total still holds over the shares.
    create("d" * 32, "carol", 2000)
    with pytest.raises(StorageQuotaError, match="job storage is free"):
        create("e" * 32, "dave", 100)
    # What an account's job releases is its own again: the result counts at its real size.
    claim = store.claim({"anime"}, "me")
    assert claim is not None and claim.job_id == "a" * 32
    store.finish(claim, "ok", result=b"r" * 300, ttl_s=TTL)
    assert store.usage("alice") == 300
    create("f" * 32, "alice", 2000)
    assert store.delete("a" * 32) and store.usage("alice") == 3000 and store.usage("bob") == 3000


def test_a_result_that_cannot_be_written_fails_its_item_and_the_job_settles(store: Store) -> None:
    _create(store, "7" * 32, 10, 10)
    first = store.claim({"anime"}, "me")
    assert first is not None
    # A failing disk: where the results go is not a directory.
    (store.files.job_dir("7" * 32) / "out").write_bytes(b"")
    job = store.finish(first, "ok", result=b"cartoon", ttl_s=TTL)
    assert job is not None and job.items[0].status == "error"
    assert job.items[0].error is not None and job.items[0].error["code"] == "internal_error"
    assert "could not be written" in job.items[0].error["message"]
    assert str(store.files.data_dir) not in job.items[0].error["message"]  # no server paths
    second = store.claim({"anime"}, "me")
    assert second is not None
    job = store.finish(second, "ok", result=b"cartoon", ttl_s=TTL)
    assert job is not None and job.status == "succeeded" and job.settled and job.failed == 2
    assert store.usage() == 0


def test_cancel_fail_expire_delete(store: Store) -> None:
    _create(store, "4" * 32, 10, 10, 10)
    running = store.claim({"anime"}, "me")
    assert running is not None
    job = store.cancel("4" * 32, ttl_s=0.0)
    assert job is not None and job.status == "cancelled"
    assert [i.status for i in job.items] == ["running", "cancelled", "cancelled"]
    assert not store.files.input_path(job.id, 1).exists() and store.waiting() == 0
    assert store.claim({"anime"}, "me") is None
    job = store.finish(running, "cancelled", ttl_s=0.0)
    assert job is not None and job.status == "cancelled" and job.done == 3
    assert store.usage() == 0
    assert store.expired(time.time() + 1) == ["4" * 32]
    assert (
        store.delete("4" * 32) and not store.files.job_dir("4" * 32).exists() and store.get("4" * 32) is None
    )
    assert not store.delete("4" * 32)
    assert store.cancel("4" * 32, ttl_s=0.0) is None and store.fail("4" * 32, "x", ttl_s=0.0) is None

    _create(store, "5" * 32, 10)
    job = store.fail("5" * 32, "style 'x' is not configured", ttl_s=TTL)
    assert job is not None and job.status == "failed" and job.error == "style 'x' is not configured"
    assert job.items[0].error == {"code": "job_failed", "message": "style 'x' is not configured"}
    assert store.expired(time.time()) == []  # not yet expired
    assert store.counts() == {"failed": 1}
    assert store.usage() == 0 and store.waiting() == 0


def test_delete_releases_everything_the_job_held(store: Store) -> None:
    _create(store, "3" * 32, 10, 20, key="gone")
    claim = store.claim({"anime"}, "me")
    assert claim is not None and store.usage() == 30 + 2000
    assert store.delete("3" * 32)
    assert store.usage() == 0 and store.waiting() == 0 and store.counts() == {}
    assert store.by_idempotency_key("gone") is None and store.recent(None, 10) == []
    assert store.finish(claim, "ok", result=b"late", ttl_s=TTL) is None  # deleted while it ran
    assert not store.files.job_dir("3" * 32).exists()
    assert store.claim({"anime"}, "me") is None


def test_webhook_state_and_listing(store: Store) -> None:
    job, _ = store.create(
        "2" * 32,
        OPTIONS,
        _uploads(10),
        webhook="https://example.com/h",
        idempotency_key=None,
        ttl_s=TTL,
        quota_bytes=QUOTA,
    )
    assert job.webhook == "https://example.com/h" and job.webhook_state == "none"
    assert store.pending_webhooks() == []
    claim = store.claim({"anime"}, "me")
    assert claim is not None
    job = store.finish(claim, "ok", result=b"x", ttl_s=TTL)  # type: ignore[assignment]
    assert job.status == "succeeded" and job.webhook_state == "pending"
    assert [j.id for j in store.pending_webhooks()] == [job.id]
    store.set_webhook_state(job.id, "delivered")
    assert store.pending_webhooks() == [] and store.get(job.id).webhook_state == "delivered"  # type: ignore[union-attr]
    time.sleep(0.01)
    _create(store, "1" * 32, 10)
    assert [j.id for j in store.recent(None, 10)] == ["1" * 32, "2" * 32]
    assert [j.id for j in store.recent("succeeded", 10)] == ["2" * 32]
    assert [j.id for j in store.recent(None, 1)] == ["1" * 32]


def test_sqlite_recover_requeues_running_items_and_removes_orphans(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    _create(store, "1" * 32, 10, 10)
    claim = store.claim({"anime"}, "dead")
    assert claim is not None
    orphan = store.files.jobs_dir / ("2" * 32)  # renamed into place, record never committed
    (orphan / "in").mkdir(parents=True)
    (store.files.staging_dir / ("3" * 32)).mkdir()
    store.close()

    # A result write killed between its write and its rename.
    stray = store.files.job_dir("1" * 32) / "out" / ".0000.png.0123abcd.tmp"
    stray.parent.mkdir()
    stray.write_bytes(b"x" * 5000)

    again = SQLiteJobStore(tmp_path / "data")
    assert again.recover() == 1
    assert not orphan.exists() and list(again.files.staging_dir.iterdir()) == []
    assert not stray.exists() and again.usage() == 20 + 2000
    job = again.get("1" * 32)
    assert job is not None and [i.status for i in job.items] == ["queued", "queued"]
    assert again.claim({"anime"}, "me").index == 0  # type: ignore[union-attr]


@pytest.mark.live
def test_redis_recover_leaves_other_runners_items_and_fresh_directories(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    data = tmp_path / "data"
    other = RedisJobStore(data, redis_server.url, lease_s=60.0, replica="other")
    _create(other, "1" * 32, 10, 10)
    held = other.claim({"anime"}, "other-runner")
    assert held is not None
    old = time.time() - 2 * 3600
    fresh_orphan = other.files.jobs_dir / ("2" * 32)  # being accepted by another replica right now
    (fresh_orphan / "in").mkdir(parents=True)
    stale_orphan = other.files.jobs_dir / ("3" * 32)  # left by a replica that died while accepting
    (stale_orphan / "in").mkdir(parents=True)
    (other.files.staging_dir / ("4" * 32)).mkdir()  # the other replica's upload in progress
    # Result writes killed between write and rename: one long ago, one maybe still in progress.
    out = other.files.job_dir("1" * 32) / "out"
    out.mkdir()
    (stale_tmp := out / ".0000.png.dead.tmp").write_bytes(b"x" * 700)
    os.utime(stale_tmp, (old, old))
    (fresh_tmp := out / ".0001.png.live.tmp").write_bytes(b"x" * 300)
    dead_staging = other.files.staging_root / "dead-replica" / ("5" * 32)
    dead_staging.mkdir(parents=True)
    for path in (stale_orphan / "in", stale_orphan, dead_staging, dead_staging.parent):
        os.utime(path, (old, old))

    store = RedisJobStore(data, redis_server.url, lease_s=60.0, replica="me")
    (store.files.staging_dir / ("6" * 32)).mkdir()  # this replica's, from before its restart
    assert store.recover() == 0
    assert list(store.files.staging_dir.iterdir()) == []
    assert (other.files.staging_dir / ("4" * 32)).is_dir() and not dead_staging.parent.exists()
    assert fresh_orphan.is_dir() and not stale_orphan.exists()
    # The stale one is gone; the fresh one counts until it is renamed or removed.
    assert not stale_tmp.exists() and fresh_tmp.exists()
    assert store.usage() == 20 + 2000 + 300
    fresh_tmp.unlink()
    assert store.usage() == 20 + 2000
    job = store.get("1" * 32)
    assert job is not None and [i.status for i in job.items] == ["running", "queued"]
    assert other.renew(held)  # still the other runner's
    assert store.claim({"anime"}, "me").index == 1  # type: ignore[union-attr]


def test_a_jobs_trace_is_kept_with_it_and_handed_out_with_its_items(store: Store) -> None:
    trace = TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "01", "congo=t61rcWkgMzE")
    job, _ = store.create(
        "8" * 32,
        OPTIONS,
        _uploads(10),
        webhook=None,
        idempotency_key=None,
        ttl_s=TTL,
        quota_bytes=QUOTA,
        trace=trace,
    )
    assert job.trace == trace and store.get(job.id).trace == trace  # type: ignore[union-attr]
    claim = store.claim({"anime"}, "me")
    assert claim is not None and claim.trace == trace
    untraced = _create(store, "9" * 32, 10)  # made by no request (or before traces)
    assert untraced.trace is None
    claim = store.claim({"anime"}, "me")
    assert claim is not None and claim.job_id == "9" * 32 and claim.trace is None
