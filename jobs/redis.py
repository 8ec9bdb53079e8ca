"""The shared job store: Redis for the records and the work queue, a shared directory for the files.

Several replicas behind a load balancer use one Redis and mount one data directory, so a job accepted
by any of them is seen, run and served by all, and outlives the replica that accepted it.

* **Records** are Redis hashes; every change that checks and writes (idempotency keys, the storage
  quota, finishing an item once, settling, cancelling, failing, deleting) is one Lua script
  (:mod:`jobs.redis_lua`, which also lists the keys), so replicas never see or make half a change.
* **Work** is a Redis stream per style and client with one consumer group: each queued item is an
  entry. A runner (one consumer) reads new entries of the styles it serves (``XREADGROUP … >``), so an
  item is never handed to a replica that cannot run its style, and clients take turns (start-time
  fair queuing by item, the tags shared by every replica in Redis); while it runs, the entry is
  pending for that runner, which renews its lease every second by resetting the entry's idle time
  (``XCLAIM … JUSTID``).
  An entry idle longer than the lease (its runner died, or lost Redis for that long) is taken over
  by the next runner that asks (``XAUTOCLAIM``). Only the entry's current holder can finish or release
  the item, so a runner that lost its lease and finishes late changes nothing.
* **Files** (photos, results) are under ``<data_dir>/jobs/<id>/`` exactly as in the embedded store,
  written with :func:`jobs.files.write_durable`; every replica must mount the same directory. A result
  is written under its final name before the item is recorded, atomically, so two runners of one item
  (after a takeover) leave one file.

Redis is the job store's database: it should persist (AOF with ``appendfsync everysec`` or
``always``); an accepted job is as durable as Redis makes it. When Redis cannot be reached, every
method raises :class:`~jobs.errors.JobStoreError` (the API answers 503 ``job_store_unavailable``) and
the runner retries.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.commands.core import Script
from redis.retry import Retry

from jobs import redis_lua
from jobs.errors import JobStoreError, StorageQuotaError
from jobs.files import JobFiles
from jobs.model import JOB_STATUSES, ItemStatus, Job, WebhookState
from jobs.records import item_from, job_from, new_item
from jobs.store import Claim, Upload, accepted_streams, existing_or_needed, quota_message
from serving import tracing
from serving.options import ResolvedOptions
from serving.tickets import ANONYMOUS
from serving.tracing import TraceContext

#: Directories under ``jobs/`` with no record, and other replicas' staging directories, untouched for
#: this long are left over from a process that died while accepting a job; accepting one takes
#: seconds, so an hour is far beyond any upload still in progress.
STALE_S: Final = 3600.0
#: Consumers (runners) that hold no item and have not been seen for this long are gone; a live
#: runner asks for work every second.
CONSUMER_IDLE_S: Final = 3600.0


def redacted(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class RedisJobStore:
    """The shared :class:`~jobs.store.JobStore` (module docstring)."""

    def __init__(
        self,
        data_dir: Path,
        url: str,
        *,
        lease_s: float,
        prefix: str = "toonserve",
        replica: str | None = None,
    ) -> None:
        """``prefix``: the keys' common part (one hash tag, ``{prefix}:…``), so several services can
        share a Redis. ``replica``: this process's name for its staging directory (default: host
        name and process id). Nothing is sent to Redis here; an unreachable one is reported at the
        first use."""
        self.data_dir = data_dir
        self.replica = replica or f"{socket.gethostname()}-{os.getpid()}"
        self.files = JobFiles(data_dir, self.replica)
        self.lease_s = lease_s
        self.url = redacted(url)
        self._p = "{" + prefix + "}:"
        try:
            self._redis = redis.Redis.from_url(
                url,
                decode_responses=True,
                socket_connect_timeout=5,
                socket_timeout=10,
                health_check_interval=30,
                # One quick retry, on connection errors only: a pooled connection that Redis closed
                # (a restart) is replaced without failing the call. The scripts tolerate running
                # twice after a lost reply (jobs.redis_lua says how); timeouts are not retried.
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 1, (redis.ConnectionError,)),
            )
        except ValueError as exc:
            raise JobStoreError(f"TOONSERVE_REDIS_URL {self.url!r} is not a Redis URL: {exc}") from exc
        self._scripts: dict[str, Script] = {
            name: self._redis.register_script(redis_lua.script(name)) for name in redis_lua.NAMES
        }

    # -- plumbing ----------------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Redis failures as :class:`JobStoreError`, with what to check."""
        try:
            yield
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise JobStoreError(
                f"Redis at {self.url} cannot be reached ({exc}); jobs are unavailable until it is back "
                "(check TOONSERVE_REDIS_URL and that Redis is running)"
            ) from exc
        except redis.RedisError as exc:
            raise JobStoreError(f"Redis at {self.url} refused a job store command: {exc}") from exc

    def _run(self, name: str, *args: str | int) -> Any:
        with self._errors():
            return self._scripts[name](keys=[], args=[self._p, *args])

    def _key(self, *parts: str) -> str:
        return self._p + ":".join(parts)

    def result_path(self, job_id: str, index: int, suffix: str) -> Path:
        return self.files.result_path(job_id, index, suffix)

    def _load_many(self, job_ids: list[str]) -> list[Job]:
        """The jobs that still exist among ``job_ids``, in that order (one round trip, one snapshot)."""
        if not job_ids:
            return []
        with self._errors():
            pipe = self._redis.pipeline(transaction=True)
            for job_id in job_ids:
                pipe.hgetall(self._key("job", job_id))
                pipe.hgetall(self._key("items", job_id))
            replies = pipe.execute()
        jobs = []
        for k in range(0, len(replies), 2):
            job = _job(replies[k], replies[k + 1])
            if job is not None:
                jobs.append(job)
        return jobs

    def _ids(self, key: str, limit: int | None = None) -> list[str]:
        with self._errors():
            ids = self._redis.zrevrange(self._key(key), 0, -1 if limit is None else limit - 1)
        return [str(i) for i in ids]

    # -- JobStore ----------------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        options: ResolvedOptions,
        uploads: list[Upload],
        *,
        webhook: str | None,
        idempotency_key: str | None,
        ttl_s: float,
        quota_bytes: int,
        client: str = ANONYMOUS,
        account: str = "",
        account_quota_bytes: int | None = None,
        trace: TraceContext | None = None,
    ) -> tuple[Job, bool]:
        existing, needed, account_quota = existing_or_needed(
            self, uploads, idempotency_key, quota_bytes, account, account_quota_bytes
        )
        if existing is not None:
            return existing, False
        self.files.write_photos(job_id, accepted_streams(uploads))
        items = [new_item(u) for u in uploads]
        now = time.time()
        try:
            outcome = self._run(
                "CREATE",
                job_id,
                options.model_dump_json(),
                options.style,
                repr(now),
                repr(now + ttl_s),
                webhook or "",
                idempotency_key or "",
                quota_bytes,
                needed,
                json.dumps(items),
                client,
                account,
                "" if account_quota is None else account_quota,
                self.files.stray_bytes,
                trace.traceparent if trace else "",
                trace.state if trace else "",
            )
        except JobStoreError:
            # Redis went away between the checks above and the record. If it ran the script but
            # the reply was lost, the job exists and needs its files; if it cannot be asked, the
            # files stay, and recover() removes them later if no record appears.
            with self._errors():
                recorded = self._redis.exists(self._key("job", job_id))
            if not recorded:
                self.files.remove(job_id)
                raise
            outcome = ["created"]
        except BaseException:
            self.files.remove(job_id)
            raise
        if outcome[0] == "quota":
            self.files.remove(job_id)
            raise StorageQuotaError(quota_message(needed, int(outcome[1]), quota_bytes))
        if outcome[0] == "account_quota":
            self.files.remove(job_id)
            assert account_quota is not None
            raise StorageQuotaError(quota_message(needed, int(outcome[1]), account_quota, own=True))
        if outcome[0] == "exists":
            # The same idempotency key, recorded by a concurrent submission (any replica) first.
            self.files.remove(job_id)
            existing = self.get(outcome[1])
            if existing is None:  # pragma: no cover - the other one was deleted in between
                raise JobStoreError(f"job {outcome[1]} of idempotency key {idempotency_key!r} vanished")
            return existing, False
        job = self.get(job_id)
        if job is None:  # pragma: no cover - deleted in between
            raise JobStoreError(f"job {job_id} vanished right after it was stored")
        return job, True

    def get(self, job_id: str) -> Job | None:
        found = self._load_many([job_id])
        return found[0] if found else None

    def by_idempotency_key(self, key: str) -> Job | None:
        with self._errors():
            job_id = self._redis.get(self._key("idem", key))
        return self.get(str(job_id)) if job_id else None

    def recent(self, status: str | None, limit: int, client: str | None = None) -> list[Job]:
        if client is None:
            return self._load_many(self._ids("created" if status is None else f"status:{status}", limit))
        # A client's jobs, newest first, in pages until enough of them have that status.
        found: list[Job] = []
        page, offset = max(limit, 100), 0
        while len(found) < limit:
            with self._errors():
                ids = self._redis.zrevrange(self._key("client", client), offset, offset + page - 1)
            if not ids:
                break
            found += [
                j for j in self._load_many([str(i) for i in ids]) if status is None or j.status == status
            ]
            offset += page
        return found[:limit]

    def claim(self, styles: Collection[str], owner: str) -> Claim | None:
        if not styles:
            return None
        lease_ms = int(self.lease_s * 1000)
        got, dropped = self._run("CLAIM", owner, lease_ms, repr(time.time()), *sorted(styles))
        for k in range(0, len(dropped), 2):
            self.files.drop_input(dropped[k], int(dropped[k + 1]))
        if not got:
            return None
        job_id, index, filename, options, entry, queue, client, traceparent, tracestate, frames, first = got
        return Claim(
            job_id,
            int(index),
            filename,
            ResolvedOptions.load(json.loads(options)),
            self.files.input_path(job_id, int(index)),
            owner,
            token=entry,
            client=client,
            queue=queue,
            trace=tracing.parse(traceparent, tracestate),
            frames=int(frames) if frames else None,
            first_frame=int(first) if first else 0,
        )

    def renew(self, claim: Claim) -> bool:
        return bool(self._run("RENEW", claim.owner, claim.queue, claim.token))

    def release(self, claim: Claim) -> None:
        now = repr(time.time())
        outcome = self._run("RELEASE", claim.owner, claim.queue, claim.token, claim.job_id, claim.index, now)
        if outcome == "cancelled":
            self.files.drop_input(claim.job_id, claim.index)

    def finish(
        self,
        claim: Claim,
        status: ItemStatus,
        *,
        result: bytes | Path | None = None,
        error: dict[str, str] | None = None,
        faces_stylized: int | None = None,
        timings_ms: dict[str, float] | None = None,
        ttl_s: float,
    ) -> Job | None:
        job_id, index = claim.job_id, claim.index
        result_bytes = 0
        if result is not None:
            if not self.renew(claim):
                # Another runner took the item over: its result (the same bytes) is its to write.
                return self.get(job_id)
            written, failure = self.files.try_write_result(job_id, index, claim.suffix, result)
            if written is None:
                return None  # deleted while it ran
            if failure is not None:
                status, error = "error", failure
            result_bytes = written
        now = time.time()
        outcome = self._run(
            "FINISH",
            claim.owner,
            claim.queue,
            claim.token,
            job_id,
            index,
            status,
            json.dumps(error) if error else "",
            "" if faces_stylized is None else faces_stylized,
            json.dumps(timings_ms) if timings_ms else "",
            result_bytes,
            repr(now),
            repr(now + ttl_s),
        )
        if outcome == "gone":
            self.files.remove(job_id)  # a result written after the job was deleted
            return None
        if outcome == "ok":
            # A chunk's clip stays until the job's clip is joined (its audio comes from it).
            self.files.drop_input(job_id, index, keep_input=claim.frames is not None and status == "ok")
        return self.get(job_id)

    def progress(self, claim: Claim, frames_done: int) -> Job | None:
        outcome = self._run(
            "PROGRESS", claim.owner, claim.queue, claim.token, claim.job_id, claim.index, frames_done,
            repr(time.time()),
        )  # fmt: skip
        return None if outcome == "gone" else self.get(claim.job_id)

    def work_dir(self, job_id: str, index: int) -> Path:
        return self.files.work_dir(job_id, index)

    def claim_dir(self, claim: Claim) -> Path:
        return self.files.claim_dir(claim.job_id, claim.index, claim.attempt, claim.first_frame)

    def join_clip(self, job: Job) -> Path:
        return self.files.join_clip(job.id, len(job.items))

    def drop_clip(self, job: Job) -> None:
        self.files.drop_clip(job.id, len(job.items))

    def cancel(self, job_id: str, ttl_s: float) -> Job | None:
        now = time.time()
        if not self._run("CANCEL", job_id, repr(now), repr(now + ttl_s)):
            return None
        job = self.get(job_id)
        for item in job.items if job else ():
            if item.status == "cancelled":
                self.files.drop_input(job_id, item.index)
        return job

    def fail(self, job_id: str, message: str, ttl_s: float) -> Job | None:
        now = time.time()
        error = json.dumps({"code": "job_failed", "message": message})
        if not self._run("FAIL", job_id, message, error, repr(now), repr(now + ttl_s)):
            return None
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        gone = bool(self._run("DELETE", job_id))
        self.files.remove(job_id)
        return gone

    def recover(self) -> int:
        """This replica's staging area is cleaned, and what dead processes left long ago: staging
        directories and job directories without a record. Items other runners hold are not touched
        (they go back through their leases), so 0."""
        self.files.reset_staging()
        self.files.sweep(self._recorded, untouched_s=STALE_S)
        self._run("PRUNE_CONSUMERS", int(CONSUMER_IDLE_S * 1000))
        return 0

    def _recorded(self, job_ids: list[str]) -> list[bool]:
        """Whether each job has a record (one round trip)."""
        with self._errors():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.exists(self._key("job", job_id))
            return [bool(n) for n in pipe.execute()]

    def expired(self, now: float) -> list[str]:
        with self._errors():
            ids = self._redis.zrangebyscore(self._key("expiry"), "-inf", now)
        return [str(i) for i in ids]

    def _active(self) -> list[tuple[str, str]]:
        """(job id, style) of the jobs that still have items to run."""
        ids = self._ids("status:queued") + self._ids("status:running")
        if not ids:
            return []
        with self._errors():
            pipe = self._redis.pipeline(transaction=False)
            for job_id in ids:
                pipe.hget(self._key("job", job_id), "style")
            styles = pipe.execute()
        return [(job_id, style) for job_id, style in zip(ids, styles, strict=True) if style]

    def active_styles(self) -> set[str]:
        return {style for _, style in self._active()}

    def jobs_of_style(self, style: str) -> list[str]:
        return [job_id for job_id, s in self._active() if s == style]

    def usage(self, account: str | None = None) -> int:
        if account is not None:
            with self._errors():
                return int(self._redis.get(self._key("usage", account)) or 0)
        with self._errors():
            return int(self._redis.get(self._key("usage")) or 0) + self.files.stray_bytes

    def waiting(self) -> int:
        with self._errors():
            return int(self._redis.get(self._key("waiting")) or 0)

    def counts(self) -> dict[str, int]:
        with self._errors():
            pipe = self._redis.pipeline(transaction=True)
            for status in JOB_STATUSES:
                pipe.zcard(self._key(f"status:{status}"))
            found = pipe.execute()
        return {status: int(n) for status, n in zip(JOB_STATUSES, found, strict=True) if n}

    def set_webhook_state(self, job_id: str, state: WebhookState) -> None:
        self._run("SET_WEBHOOK_STATE", job_id, state)

    def pending_webhooks(self) -> list[Job]:
        with self._errors():
            ids = sorted(str(i) for i in self._redis.smembers(self._key("webhooks")))
        return [j for j in self._load_many(ids) if j.terminal and j.webhook_state == "pending"]

    def ping(self) -> None:
        """Raises :class:`JobStoreError` unless Redis answers."""
        with self._errors():
            self._redis.ping()

    def close(self) -> None:
        self._redis.close()


def _job(fields: dict[str, str], items: dict[str, str]) -> Job | None:
    """A job from its hash and its items' hash (None if the job is not there)."""
    if not fields:
        return None
    ordered = sorted(items.items(), key=lambda kv: int(kv[0]))
    return job_from(fields, (item_from(int(index), json.loads(raw)) for index, raw in ordered))
