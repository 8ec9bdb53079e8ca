"""Job events streams that cannot amplify: one store read per change for all of a job's listeners
(:mod:`jobs.events`), every listener still gets every event, and streams are capped per client and
in all (``GET /jobs/{id}/events``)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from devkit import photos
from devkit.redis_server import RedisServer
from devkit.reference_graphs import ReferenceModelDir
from jobs.events import EventHub, Snapshot, StreamSlots
from jobs.model import Job
from jobs.redis import RedisJobStore
from jobs.sqlite import SQLiteJobStore
from jobs.store import Claim, JobStore, Upload
from service.app import create_app
from serving.options import ResolvedOptions
from tests.api.conftest import jobs_settings, service_state, small_jpeg, sse_events, wait_ready

OPTIONS = ResolvedOptions(style="anime", processing_size=720, format="png", quality=90)
TTL = 3600.0


class CountingStore(SQLiteJobStore):
    """The embedded store, counting its ``get`` calls."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.reads = 0
        self._count_lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._count_lock:
            self.reads += 1
        return super().get(job_id)


class Counted:
    """Any store, its ``get`` calls counted (the app's store, wrapped for its events hub)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.reads = 0
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            self.reads += 1
        return self.store.get(job_id)


def _create(store: JobStore, job_id: str, photos_in_job: int, style: str = "anime") -> Job:
    uploads = [Upload(f"{i}.jpg", io.BytesIO(b"x" * 10), 10, None, 100) for i in range(photos_in_job)]
    job, created = store.create(
        job_id,
        OPTIONS.model_copy(update={"style": style}),
        uploads,
        webhook=None,
        idempotency_key=None,
        ttl_s=TTL,
        quota_bytes=10**9,
    )
    assert created
    return job


def _finish_next(store: JobStore, style: str = "anime") -> Claim:
    claim = store.claim({style}, "test-runner")
    assert claim is not None
    store.finish(claim, "ok", result=b"toon", faces_stylized=1, ttl_s=TTL)
    return claim


async def _until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


# -- the hub alone ---------------------------------------------------------------------------------


def test_many_listeners_cost_one_read_per_change(tmp_path: Path) -> None:
    """50 listeners of one job: each change (a burst of notifications) is one store read, handed to
    all of them; the watcher stops once the job has settled."""
    store = CountingStore(tmp_path / "data")
    job = _create(store, "a" * 32, 3)

    async def main() -> None:
        hub = EventHub(store, poll_s=3600.0)  # no polls: only notified changes are read
        with contextlib.ExitStack() as stack:
            listeners = [stack.enter_context(contextlib.closing(hub.listen(job.id))) for _ in range(50)]
            assert hub.watched == 1
            store.reads = 0
            for change in range(1, 4):
                _finish_next(store)
                for _ in range(20):  # a burst: one read
                    hub.notify(job.id)
                snapshots = [await listener.next(5.0) for listener in listeners]
                assert store.reads == change
                for snapshot in snapshots:
                    assert snapshot is not None and snapshot.job is not None
                    assert snapshot.job.done == change
            last = snapshots[0]
            assert last is not None and last.job is not None and last.job.settled
            await _until(lambda: hub.watched == 0)  # the job settled: its watcher is gone
            hub.notify(job.id)  # nobody watches: nothing is read
            await asyncio.sleep(0.05)
            assert store.reads == 3

    asyncio.run(main())
    store.close()


@pytest.mark.slow
def test_polls_are_per_job_and_only_while_listened_to(tmp_path: Path) -> None:
    """Another replica's changes are found by polling: once per interval for the job, whatever its
    listeners, and not at all without listeners; a poll that finds nothing new wakes nobody."""
    store = CountingStore(tmp_path / "data")
    job = _create(store, "b" * 32, 2)

    async def main() -> None:
        hub = EventHub(store, poll_s=0.05)
        with contextlib.ExitStack() as stack:
            listeners = [stack.enter_context(contextlib.closing(hub.listen(job.id))) for _ in range(40)]
            store.reads = 0
            await asyncio.sleep(0.5)
            assert 3 <= store.reads <= 12, store.reads  # about 10 polls, not 40 × 10
            for listener in listeners:
                assert await listener.next(0.0) is not None  # the first read is handed over
            await asyncio.sleep(0.2)
            assert await listeners[0].next(0.0) is None  # the polls since found nothing new
            await asyncio.to_thread(_finish_next, store)  # not notified: "another replica"
            await asyncio.sleep(0.2)
            snapshot = await listeners[-1].next(0.0)  # the newest, whatever came between
            assert snapshot is not None and snapshot.job is not None and snapshot.job.done == 1
        await _until(lambda: hub.watched == 0)  # the last listener left: the watcher stopped
        reads = store.reads
        await asyncio.sleep(0.3)
        assert store.reads == reads

    asyncio.run(main())
    store.close()


def test_a_slow_listener_holds_only_the_latest_snapshot(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    job = _create(store, "c" * 32, 4)

    async def main() -> None:
        hub = EventHub(store, poll_s=3600.0)
        with contextlib.closing(hub.listen(job.id)) as slow, contextlib.closing(hub.listen(job.id)) as quick:
            for change in range(1, 4):
                _finish_next(store)
                hub.notify(job.id)
                got = await quick.next(5.0)
                assert got is not None and got.job is not None and got.job.done == change
            # The slow one never took a snapshot: it holds one, the newest, with every ended item.
            latest = await slow.next(0.0)
            assert latest is not None and latest.job is not None and latest.job.done == 3
            assert await slow.next(0.0) is None

    asyncio.run(main())
    store.close()


def test_a_deleted_job_is_handed_over_as_none(tmp_path: Path) -> None:
    store = SQLiteJobStore(tmp_path / "data")
    job = _create(store, "d" * 32, 2)

    async def main() -> None:
        hub = EventHub(store, poll_s=3600.0)
        with contextlib.closing(hub.listen(job.id)) as listener:
            store.delete(job.id)
            hub.notify(job.id)
            assert await listener.next(5.0) == Snapshot(None)
            await _until(lambda: hub.watched == 0)

    asyncio.run(main())
    store.close()


def test_streams_connecting_start_from_the_watchers_read(tmp_path: Path) -> None:
    """The first stream's own read is kept for the next ones; once the watcher has read, its read."""
    store = CountingStore(tmp_path / "data")
    job = _create(store, "e" * 32, 2)

    async def main() -> None:
        hub = EventHub(store, poll_s=3600.0)
        first = hub.listen(job.id)
        assert first.known() is None
        seeded = first.seed(store.get(job.id))
        later = hub.listen(job.id)
        assert later.known() is seeded and seeded.job == job
        assert later.seed(None) is not seeded and later.known() is seeded  # the first read stays
        _finish_next(store)
        hub.notify(job.id)
        got = await later.next(5.0)
        assert got is not None and got.job is not None and got.job.done == 1
        assert hub.listen(job.id).known() is got
        assert await later.next(0.01) is None  # nothing newer: it times out empty
        later.offer(Snapshot(None))
        later.offer(Snapshot(None))  # a second one replaces the first
        assert await later.next(0.01) == Snapshot(None)
        assert await later.next(0.01) is None
        first.close()
        first.close()  # again: nothing

    asyncio.run(main())
    store.close()


def test_stream_slots_per_client_and_in_all() -> None:
    slots = StreamSlots(per_client=2, total=3)
    assert slots.take("a") is None and slots.take("a") is None
    assert slots.take("a") == "client"
    assert slots.take("a", limit=3) is None  # a key's own cap
    assert slots.take("b") == "total"
    slots.give("a")
    assert slots.take("b") is None and slots.open() == 3 and slots.open("a") == 2
    for key in ("a", "a", "b"):
        slots.give(key)
    assert slots.open() == 0
    with pytest.raises(RuntimeError):
        slots.give("a")


# -- through the app -------------------------------------------------------------------------------


def _events(r: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    return sse_events(r.iter_lines())


def _follow(client: TestClient, job_id: str, ready: threading.Barrier | None = None) -> list[Any]:
    with client.stream("GET", f"/jobs/{job_id}/events") as r:
        assert r.status_code == 200, r.read()
        if ready is not None:
            ready.wait(30)
        return _events(r)


def _hold_jobs(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner takes no item: jobs stay queued (and their streams open) until the test ends."""
    monkeypatch.setattr(service_state(client).jobs.runner, "_servable", lambda: set())


def _submit(client: TestClient, count: int = 1) -> str:
    files = [("images", (f"{i}.jpg", small_jpeg(photos.astronaut(), 128 + 16 * i))) for i in range(count)]
    r = client.post("/jobs", files=files)
    assert r.status_code == 202, r.text
    job_id: str = r.json()["id"]
    return job_id


@pytest.mark.slow
def test_every_listener_gets_every_item_and_the_end(
    jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """12 listeners of a job as it runs: each gets `job` first, every item once (in its `job` or as
    an `item`), then `end`; the job is read for all of them together, not once per listener."""
    from inference.pipeline import Cartoonizer

    real_detect = Cartoonizer.detect

    def slow_detect(self: Cartoonizer, job: Any) -> None:
        time.sleep(0.3)  # the items take long enough for the listeners to see them one by one
        real_detect(self, job)

    monkeypatch.setattr(Cartoonizer, "detect", slow_detect)
    jobs = service_state(jobs_client).jobs
    counted = Counted(jobs.store)
    jobs.hub.store = counted  # type: ignore[assignment]
    runner = jobs.runner
    servable = runner._servable
    monkeypatch.setattr(runner, "_servable", lambda: set())  # held until every listener is in
    job_id = _submit(jobs_client, 4)
    listeners = 12
    ready = threading.Barrier(listeners + 1)
    started = time.monotonic()
    with ThreadPoolExecutor(listeners) as pool:
        futures = [pool.submit(_follow, jobs_client, job_id, ready) for _ in range(listeners)]
        ready.wait(30)
        monkeypatch.setattr(runner, "_servable", servable)  # taken at the runner's next poll (1 s)
        results = [f.result(timeout=120) for f in futures]
    took = time.monotonic() - started
    for events in results:
        names = [name for name, _ in events]
        assert names[0] == "job" and names[-1] == "end", names
        items = [data["index"] for name, data in events if name == "item"]
        assert sorted(items) == sorted(set(items)) == [0, 1, 2, 3]  # all queued when it connected
        assert events[-1][1]["status"] == "succeeded" and events[-1][1]["done"] == 4
    # One read per change (4 items and the job's end, maybe each notified apart) and one per second
    # for other replicas; 12 listeners reading every second would be about 12 × took.
    assert counted.reads <= 8 + took * 1.5, (counted.reads, took)
    assert jobs.streams.open() == 0 and jobs.hub.watched == 0


@pytest.mark.slow
def test_a_late_listener_gets_the_state_first(
    jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from inference.pipeline import Cartoonizer

    real_detect = Cartoonizer.detect

    def slow_detect(self: Cartoonizer, job: Any) -> None:
        time.sleep(0.5)
        real_detect(self, job)

    monkeypatch.setattr(Cartoonizer, "detect", slow_detect)
    job_id = _submit(jobs_client, 3)
    deadline = time.monotonic() + 60
    while jobs_client.get(f"/jobs/{job_id}").json()["done"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    events = _follow(jobs_client, job_id)
    name, first = events[0]
    assert name == "job" and first["done"] >= 1 and first["id"] == job_id
    done_at_start = {i["index"] for i in first["items"] if i["status"] == "ok"}
    items = {data["index"] for name, data in events if name == "item"}
    assert not done_at_start & items and done_at_start | items == {0, 1, 2}
    assert events[-1][0] == "end" and events[-1][1]["done"] == 3


def test_an_idle_stream_sends_keep_alives(jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import api.jobs

    monkeypatch.setattr(api.jobs, "_HEARTBEAT_S", 0.2)
    _hold_jobs(jobs_client, monkeypatch)
    job_id = _submit(jobs_client)
    with jobs_client.stream("GET", f"/jobs/{job_id}/events") as r:
        lines = r.iter_lines()
        assert next(lines) == "event: job"
        seen = [next(lines) for _ in range(6)]
    assert seen.count(": keep-alive") >= 2, seen


@pytest.mark.parametrize("jobs_client", [{"client_event_streams": 2}], indirect=True)
def test_a_client_holds_at_most_its_streams_until_it_disconnects(
    jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    _hold_jobs(jobs_client, monkeypatch)
    job_id = _submit(jobs_client)
    url = f"/jobs/{job_id}/events"
    streams = service_state(jobs_client).jobs.streams
    for _ in range(2):  # open two, refused a third, close them, and the same again
        with contextlib.ExitStack() as stack:
            for _ in range(2):
                r = stack.enter_context(jobs_client.stream("GET", url))
                assert r.status_code == 200
            assert streams.open() == 2
            refused = jobs_client.get(url)
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["code"] == "too_many_requests"
            assert "2 events streams open" in refused.json()["error"]["message"]
            assert int(refused.headers["retry-after"]) >= 1
            assert refused.headers["ratelimit-policy"] == '"streams";q=2'
            assert refused.headers["ratelimit"].startswith('"streams";r=0;t=')
            assert jobs_client.get(f"/jobs/{job_id}").status_code == 200  # the job itself is not capped
        assert streams.open() == 0  # the clients went away: their slots are free
    assert service_state(jobs_client).jobs.hub.watched == 0
    # A refused or unknown job's stream takes no slot either.
    assert jobs_client.get(f"/jobs/{'0' * 32}/events").status_code == 404
    assert streams.open() == 0
    metrics = jobs_client.get("/metrics").text
    assert "toonserve_job_event_streams 0.0" in metrics


def test_a_keys_own_cap_and_other_clients(
    model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caps are per client: one at its key's own cap (``event_streams=1``) does not hold back another."""
    keys = tmp_path / "keys"
    keys.write_text("alice=alice-key event_streams=1\nbob=bob-key\n")
    settings = jobs_settings(model_dir, tmp_path, api_keys_file=keys, client_event_streams=2)
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        _hold_jobs(client, monkeypatch)
        alice, bob = {"X-API-Key": "alice-key"}, {"X-API-Key": "bob-key"}
        files = [("images", ("a.jpg", small_jpeg(photos.astronaut())))]
        jobs = {
            who: client.post("/jobs", files=files, headers=h).json()["id"]
            for who, h in (("a", alice), ("b", bob))
        }
        with contextlib.ExitStack() as stack:
            assert (
                stack.enter_context(
                    client.stream("GET", f"/jobs/{jobs['a']}/events", headers=alice)
                ).status_code
                == 200
            )
            r = client.get(f"/jobs/{jobs['a']}/events", headers=alice)
            assert r.status_code == 429 and r.headers["ratelimit-policy"] == '"streams";q=1'
            for _ in range(2):
                assert (
                    stack.enter_context(
                        client.stream("GET", f"/jobs/{jobs['b']}/events", headers=bob)
                    ).status_code
                    == 200
                )
            assert client.get(f"/jobs/{jobs['b']}/events", headers=bob).status_code == 429


@pytest.mark.parametrize("jobs_client", [{"max_event_streams": 3}], indirect=True)
def test_the_total_cap(jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    _hold_jobs(jobs_client, monkeypatch)
    url = f"/jobs/{_submit(jobs_client)}/events"
    with contextlib.ExitStack() as stack:
        held = [stack.enter_context(jobs_client.stream("GET", url)) for _ in range(3)]
        assert [r.status_code for r in held] == [200] * 3
        refused = jobs_client.get(url)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "event_streams_full"
        assert int(refused.headers["retry-after"]) >= 1
        held[0].close()
        with jobs_client.stream("GET", url) as again:
            assert again.status_code == 200


@pytest.mark.slow
def test_a_deleted_job_ends_its_streams(jobs_client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleted under its streams (by another replica, or expiry: not notified here): each one ends
    with ``end`` status deleted, found by the watcher's poll."""
    _hold_jobs(jobs_client, monkeypatch)
    job_id = _submit(jobs_client, 2)
    store = service_state(jobs_client).jobs.store
    ready = threading.Barrier(4)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(_follow, jobs_client, job_id, ready) for _ in range(3)]
        ready.wait(30)
        assert store.delete(job_id)
        results = [f.result(timeout=30) for f in futures]
    for events in results:
        assert [name for name, _ in events] == ["job", "end"]
        assert events[-1][1] == {"id": job_id, "status": "deleted"}
    assert service_state(jobs_client).jobs.streams.open() == 0


@pytest.mark.live
def test_redis_streams_follow_another_replicas_work(
    model_dir: ReferenceModelDir, tmp_path: Path, redis_server: RedisServer
) -> None:
    """With the shared store, a job run by another replica (a style this one does not serve) is
    followed by this replica's streams, from polls alone: one read per poll for all of them."""
    settings = jobs_settings(model_dir, tmp_path, jobs_backend="redis", redis_url=redis_server.url)
    other = RedisJobStore(tmp_path / "data", redis_server.url, lease_s=60.0, replica="other")
    job = _create(other, "f" * 32, 3, style="3d")  # not served here: only "other" runs it
    with TestClient(create_app(settings)) as client:
        wait_ready(client)
        jobs = service_state(client).jobs
        counted = Counted(jobs.store)
        jobs.hub.store = counted  # type: ignore[assignment]
        ready = threading.Barrier(6)
        with ThreadPoolExecutor(5) as pool:
            futures = [pool.submit(_follow, client, job.id, ready) for _ in range(5)]
            ready.wait(30)
            started = time.monotonic()
            for _ in range(3):
                time.sleep(0.3)
                _finish_next(other, "3d")
            results = [f.result(timeout=30) for f in futures]
        took = time.monotonic() - started
    other.close()
    for events in results:
        names = [name for name, _ in events]
        assert names == ["job", "item", "item", "item", "end"], names
        assert events[-1][1]["status"] == "succeeded"
    assert counted.reads <= 3 + took * 1.5, (counted.reads, took)
