"""The embedded job store: durable acceptance, hand-out order, idempotency, quota, recovery, expiry."""

from __future__ import annotations

import io
import threading
import time
from pathlib import Path

import pytest

from jobs.errors import StorageQuotaError
from jobs.model import JobOptions
from jobs.sqlite import SQLiteJobStore
from jobs.store import Upload

OPTIONS = JobOptions("anime", 1.0, 720, None, "png", 90, "background")
TTL = 3600.0
QUOTA = 10**9


def _uploads(*sizes: int, refused: tuple[int, ...] = ()) -> list[Upload]:
    out = []
    for i, size in enumerate(sizes):
        if i in refused:
            out.append(Upload(f"{i}.txt", None, 0, {"code": "unsupported_image", "message": "no"}, 0))
        else:
            out.append(Upload(f"{i}.jpg", io.BytesIO(bytes([i]) * size), size, None, 1000))
    return out


@pytest.fixture
def store(tmp_path: Path) -> SQLiteJobStore:
    return SQLiteJobStore(tmp_path / "data")


def _create(store: SQLiteJobStore, job_id: str, *sizes: int, key: str | None = None, **kw: object) -> object:
    job, created = store.create(
        job_id,
        OPTIONS,
        _uploads(*sizes, **kw),
        webhook=None,
        idempotency_key=key,
        ttl_s=TTL,
        quota_bytes=QUOTA,  # type: ignore[arg-type]
    )
    assert created
    return job


def test_a_job_is_stored_with_its_photos_and_handed_out_in_order(store: SQLiteJobStore) -> None:
    _create(store, "a" * 32, 10, 20, 30, refused=(1,))
    job = store.get("a" * 32)
    assert job is not None and job.status == "queued"
    assert [i.status for i in job.items] == ["queued", "error", "queued"]
    assert job.items[1].error == {"code": "unsupported_image", "message": "no"}
    assert store.input_path(job.id, 0).read_bytes() == b"\x00" * 10
    assert not store.input_path(job.id, 1).exists()
    assert store.usage() == 10 + 30 + 2 * 1000 and store.waiting() == 2

    first = store.claim({"anime"}, "me")
    assert first is not None and first.index == 0
    assert store.get(job.id).status == "running"  # type: ignore[union-attr]
    assert store.claim({"3d"}, "me") is None  # the job's style cannot run here
    second = store.claim({"anime"}, "me")
    assert second is not None and second.index == 2
    assert store.claim({"anime"}, "me") is None

    job = store.finish(first, "ok", result=b"png!", faces_stylized=1, timings_ms={"head": 1.0}, ttl_s=TTL)
    assert job is not None and job.status == "running"
    assert store.result_path(job.id, 0, "png").read_bytes() == b"png!"
    assert not store.input_path(job.id, 0).exists()  # the photo goes once its item has ended
    job = store.finish(second, "error", error={"code": "no_face", "message": "none"}, ttl_s=TTL)
    assert job is not None and job.status == "succeeded" and (job.done, job.failed) == (3, 2)
    assert store.usage() == 4
    assert job.expires_at > time.time() + TTL - 5


def test_idempotency_key_returns_the_first_job(store: SQLiteJobStore) -> None:
    _create(store, "b" * 32, 10, key="k")
    again, created = store.create(
        "c" * 32, OPTIONS, _uploads(10), webhook=None, idempotency_key="k", ttl_s=TTL, quota_bytes=QUOTA
    )
    assert not created and again.id == "b" * 32
    assert store.get("c" * 32) is None and not store.job_dir("c" * 32).exists()


def test_concurrent_submissions_with_one_key_make_one_job(store: SQLiteJobStore) -> None:
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
    assert sorted(p.name for p in store.jobs_dir.iterdir()) == [ids[0]]


def test_quota_refuses_before_writing(store: SQLiteJobStore) -> None:
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
    assert store.get("d" * 32) is None and list(store.jobs_dir.iterdir()) == []
    store.create(
        "e" * 32, OPTIONS, _uploads(100), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=2000
    )
    # 1100 reserved now: a second one of the same size no longer fits.
    with pytest.raises(StorageQuotaError):
        store.create(
            "f" * 32, OPTIONS, _uploads(100), webhook=None, idempotency_key=None, ttl_s=TTL, quota_bytes=2000
        )


def test_recover_requeues_running_items_and_removes_orphans(store: SQLiteJobStore, tmp_path: Path) -> None:
    _create(store, "1" * 32, 10, 10)
    claim = store.claim({"anime"}, "dead")
    assert claim is not None
    orphan = store.jobs_dir / ("2" * 32)  # renamed into place, record never committed
    (orphan / "in").mkdir(parents=True)
    (store.staging_dir / ("3" * 32)).mkdir()
    store.close()

    again = SQLiteJobStore(tmp_path / "data")
    assert again.recover() == 1
    assert not orphan.exists() and list(again.staging_dir.iterdir()) == []
    job = again.get("1" * 32)
    assert job is not None and [i.status for i in job.items] == ["queued", "queued"]
    assert again.claim({"anime"}, "me").index == 0  # type: ignore[union-attr]


def test_cancel_fail_expire_delete(store: SQLiteJobStore) -> None:
    _create(store, "4" * 32, 10, 10, 10)
    running = store.claim({"anime"}, "me")
    assert running is not None
    job = store.cancel("4" * 32, ttl_s=0.0)
    assert job is not None and job.status == "cancelled"
    assert [i.status for i in job.items] == ["running", "cancelled", "cancelled"]
    job = store.finish(running, "cancelled", ttl_s=0.0)
    assert job is not None and job.status == "cancelled" and job.done == 3
    assert store.expired(time.time() + 1) == ["4" * 32]
    assert store.delete("4" * 32) and not store.job_dir("4" * 32).exists() and store.get("4" * 32) is None

    _create(store, "5" * 32, 10)
    job = store.fail("5" * 32, "style 'x' is not configured", ttl_s=TTL)
    assert job is not None and job.status == "failed" and job.error == "style 'x' is not configured"
    assert job.items[0].error == {"code": "job_failed", "message": "style 'x' is not configured"}
    assert store.expired(time.time()) == []  # not yet expired
    assert store.counts() == {"failed": 1}
