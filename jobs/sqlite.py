"""The embedded job store: SQLite (WAL, synchronous=FULL) for the records, files for the photos.

One process owns the database (the default single-replica service): SQLite's own locking keeps it
consistent, and a process lock serialises this process's threads on one connection. Every commit is
durable when it returns (WAL with ``synchronous=FULL`` fsyncs the log on commit).

Accepting a job: the photos go to ``<data_dir>/staging/<id>/`` (each fsynced), the directory is
renamed to ``<data_dir>/jobs/<id>/`` and fsynced, then the records are committed. A crash before the
commit leaves a directory without a record, which :meth:`SQLiteJobStore.recover` removes; a crash
after it leaves a complete job.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

from jobs.errors import JobStoreError
from jobs.files import JobFiles
from jobs.model import TERMINAL, ItemStatus, Job, JobStatus, WebhookState
from jobs.records import ITEM_FIELDS, item_from, job_from, new_item
from jobs.store import Claim, Upload, accepted_streams, check_room, existing_or_needed
from serving import tracing
from serving.fair_queue import Turns
from serving.options import ResolvedOptions
from serving.tickets import ANONYMOUS
from serving.tracing import TraceContext

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    options TEXT NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    webhook TEXT,
    webhook_state TEXT NOT NULL DEFAULT 'none',
    idempotency_key TEXT UNIQUE,
    error TEXT,
    client TEXT NOT NULL DEFAULT 'anonymous',
    account TEXT NOT NULL DEFAULT '',
    traceparent TEXT NOT NULL DEFAULT '',
    tracestate TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    filename TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    faces_stylized INTEGER,
    timings TEXT,
    input_bytes INTEGER NOT NULL DEFAULT 0,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    estimate INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS items_by_status ON items(status, job_id, idx);
CREATE INDEX IF NOT EXISTS jobs_by_created ON jobs(created_at);
"""
#: Indexes of columns a database made by an earlier version gains at start-up (after the migration).
_INDEXES: Final = (
    "CREATE INDEX IF NOT EXISTS jobs_by_client ON jobs(client, created_at);"
    "CREATE INDEX IF NOT EXISTS jobs_by_account ON jobs(account);"
)
#: The jobs table's columns of a record (jobs.records), and the items table's (timings_ms is "timings").
_JOB_COLUMNS: Final = (
    "id",
    "status",
    "options",
    "created_at",
    "updated_at",
    "expires_at",
    "webhook",
    "webhook_state",
    "idempotency_key",
    "error",
    "client",
    "traceparent",
    "tracestate",
)
_ITEM_COLUMNS: Final = tuple("timings" if f == "timings_ms" else f for f in ITEM_FIELDS)
#: Columns added since the first schema: (table, column, definition).
_ADDED_COLUMNS: Final = (
    ("jobs", "client", "TEXT NOT NULL DEFAULT 'anonymous'"),
    # Jobs stored before accounts count in the total only.
    ("jobs", "account", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "traceparent", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "tracestate", "TEXT NOT NULL DEFAULT ''"),
    # A video item's frames (NULL: a photo) and how many are written.
    ("items", "frames", "INTEGER"),
    ("items", "first_frame", "INTEGER NOT NULL DEFAULT 0"),
    ("items", "frames_done", "INTEGER NOT NULL DEFAULT 0"),
)

#: What an item still holds on disk: its photo until it ends, then its result; plus the estimate
#: reserved for a result not yet written.
_USAGE_SQL: Final = (
    "SELECT COALESCE(SUM(input_bytes + result_bytes + "
    "CASE WHEN status IN ('queued', 'running') THEN estimate ELSE 0 END), 0) FROM items"
)
#: The same for the jobs of one account.
_ACCOUNT_USAGE_SQL: Final = (
    "SELECT COALESCE(SUM(i.input_bytes + i.result_bytes + "
    "CASE WHEN i.status IN ('queued', 'running') THEN i.estimate ELSE 0 END), 0) "
    "FROM items AS i JOIN jobs AS j ON j.id = i.job_id WHERE j.account = ?"
)


def _row(record: dict[str, Any]) -> tuple[Any, ...]:
    """An item's record as the items table's columns (structured fields as JSON text)."""
    return tuple(
        json.dumps(record[f]) if f in ("error", "timings_ms") and record[f] is not None else record[f]
        for f in ITEM_FIELDS
    )


class SQLiteJobStore:
    """The embedded :class:`~jobs.store.JobStore` (module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files = JobFiles(data_dir)
        try:
            self._db = sqlite3.connect(data_dir / "jobs.db", check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.executescript(_SCHEMA)
            for table, column, definition in _ADDED_COLUMNS:
                have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                if column not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
            self._db.executescript(_INDEXES)
        except (OSError, sqlite3.Error) as exc:
            raise JobStoreError(f"the job store at {data_dir} cannot be used: {exc}") from exc
        self._lock = threading.Lock()
        #: Which client's item is claimed next.
        self._turns = Turns()

    # -- plumbing ----------------------------------------------------------------------------------

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def result_path(self, job_id: str, index: int, suffix: str) -> Path:
        return self.files.result_path(job_id, index, suffix)

    def _load(self, db: sqlite3.Connection, job_id: str) -> Job | None:
        cursor = db.execute(f"SELECT {', '.join(_JOB_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        row = cursor.fetchone()
        if row is None:
            return None
        items = db.execute(
            f"SELECT idx, {', '.join(_ITEM_COLUMNS)} FROM items WHERE job_id = ? ORDER BY idx", (job_id,)
        )
        fields = [*ITEM_FIELDS]
        return job_from(
            dict(zip(_JOB_COLUMNS, row, strict=True)),
            (item_from(r[0], dict(zip(fields, r[1:], strict=True))) for r in items),
        )

    def _set_job(
        self, db: sqlite3.Connection, job_id: str, status: JobStatus, ttl_s: float, **extra: Any
    ) -> None:
        now = time.time()
        fields = {"status": status, "updated_at": now, **extra}
        if status in TERMINAL:
            fields["expires_at"] = now + ttl_s
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def _settle(self, db: sqlite3.Connection, job_id: str, ttl_s: float) -> None:
        """End the job when every item has ended (succeeded, unless it was cancelled or failed)."""
        status, webhook = db.execute("SELECT status, webhook FROM jobs WHERE id = ?", (job_id,)).fetchone()
        left = db.execute(
            "SELECT COUNT(*) FROM items WHERE job_id = ? AND status IN ('queued', 'running')", (job_id,)
        ).fetchone()[0]
        if left == 0 and status not in TERMINAL:
            self._set_job(db, job_id, "succeeded", ttl_s, webhook_state="pending" if webhook else "none")

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
        now = time.time()
        try:
            with self._tx() as db:
                # Decided again under the lock: concurrent submissions cannot both fit.
                used = db.execute(_USAGE_SQL).fetchone()[0] + self.files.stray_bytes
                mine = (
                    0 if account_quota is None else db.execute(_ACCOUNT_USAGE_SQL, (account,)).fetchone()[0]
                )
                check_room(needed, used, quota_bytes, mine, account_quota)
                db.execute(
                    "INSERT INTO jobs (id, status, options, created_at, updated_at, expires_at, webhook, "
                    "idempotency_key, client, account, traceparent, tracestate) "
                    "VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job_id,
                        options.model_dump_json(),
                        now,
                        now,
                        now + ttl_s,
                        webhook,
                        idempotency_key,
                        client,
                        account,
                        trace.traceparent if trace else "",
                        trace.state if trace else "",
                    ),
                )
                db.executemany(
                    f"INSERT INTO items (job_id, idx, {', '.join(_ITEM_COLUMNS)}) "
                    f"VALUES (?, ?, {', '.join('?' * len(_ITEM_COLUMNS))})",
                    [(job_id, i, *_row(new_item(u))) for i, u in enumerate(uploads)],
                )
                self._settle(db, job_id, ttl_s)  # every photo refused: the job has ended already
                job = self._load(db, job_id)
        except sqlite3.IntegrityError:
            # The same idempotency key, committed by a concurrent submission first.
            self.files.remove(job_id)
            assert idempotency_key is not None
            existing = self.by_idempotency_key(idempotency_key)
            if existing is None:  # pragma: no cover - the other one was deleted in between
                raise
            return existing, False
        except BaseException:
            self.files.remove(job_id)
            raise
        assert job is not None
        return job, True

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._load(self._db, job_id)

    def by_idempotency_key(self, key: str) -> Job | None:
        rows = self._read("SELECT id FROM jobs WHERE idempotency_key = ?", (key,))
        return self.get(rows[0][0]) if rows else None

    def recent(self, status: str | None, limit: int, client: str | None = None) -> list[Job]:
        where = [
            (clause, value) for clause, value in (("status = ?", status), ("client = ?", client)) if value
        ]
        condition = f"WHERE {' AND '.join(c for c, _ in where)} " if where else ""
        rows = self._read(
            f"SELECT id FROM jobs {condition}ORDER BY created_at DESC LIMIT ?",
            (*(v for _, v in where), limit),
        )
        jobs = [self.get(r[0]) for r in rows]
        return [j for j in jobs if j is not None]

    def claim(self, styles: Collection[str], owner: str) -> Claim | None:
        if not styles:
            return None
        marks = ", ".join("?" * len(styles))
        with self._tx() as db:
            # Clients with work, in the order of their turns (the oldest job first among equals).
            waiting = db.execute(
                "SELECT client, MIN(created_at) FROM jobs WHERE status IN ('queued', 'running') "
                "GROUP BY client"
            ).fetchall()
            order = sorted(waiting, key=lambda row: (self._turns.start(row[0]), row[1]))
            for client, _ in order:
                row = db.execute(
                    "SELECT j.id, j.options, i.idx, i.filename, j.traceparent, j.tracestate, i.frames, "
                    "i.first_frame "
                    "FROM items i JOIN jobs j ON j.id = i.job_id "
                    "WHERE j.client = ? AND i.status = 'queued' AND j.status IN ('queued', 'running') "
                    f"AND json_extract(j.options, '$.style') IN ({marks}) "
                    "ORDER BY j.created_at, i.idx LIMIT 1",
                    (client, *styles),
                ).fetchone()
                if row is None:
                    continue
                job_id, options_json, index, filename, traceparent, tracestate, frames, first_frame = row
                db.execute(
                    "UPDATE items SET status = 'running' WHERE job_id = ? AND idx = ?", (job_id, index)
                )
                db.execute(
                    "UPDATE jobs SET status = 'running', updated_at = ? WHERE id = ? AND status = 'queued'",
                    (time.time(), job_id),
                )
                self._turns.served(self._turns.book(client, 1.0), {c for c, _ in waiting})
                options = ResolvedOptions.load(json.loads(options_json))
                path = self.files.input_path(job_id, index)
                trace = tracing.parse(traceparent, tracestate)
                return Claim(
                    job_id, index, filename, options, path, owner, client=client, trace=trace,
                    frames=frames, first_frame=first_frame or 0,
                )  # fmt: skip
        return None

    def renew(self, claim: Claim) -> bool:
        return True  # one process owns the store: a claim is never lost to another

    def release(self, claim: Claim) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE items SET status = 'queued' WHERE job_id = ? AND idx = ? AND status = 'running'",
                (claim.job_id, claim.index),
            )

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
            written, failure = self.files.try_write_result(job_id, index, claim.suffix, result)
            if written is None:
                return None  # deleted while it ran
            if failure is not None:
                status, error = "error", failure
            result_bytes = written
        with self._tx() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
                return None
            db.execute(
                "UPDATE items SET status = ?, error = ?, faces_stylized = ?, timings = ?, input_bytes = 0, "
                "result_bytes = ? WHERE job_id = ? AND idx = ?",
                (
                    status,
                    json.dumps(error) if error else None,
                    faces_stylized,
                    json.dumps(timings_ms) if timings_ms else None,
                    result_bytes,
                    job_id,
                    index,
                ),
            )
            db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time(), job_id))
            self._settle(db, job_id, ttl_s)
            job = self._load(db, job_id)
        # A chunk's clip stays until the job's clip is joined (its audio comes from it).
        self.files.drop_input(job_id, index, keep_input=claim.frames is not None and status == "ok")
        return job

    def progress(self, claim: Claim, frames_done: int) -> Job | None:
        with self._tx() as db:
            changed = db.execute(
                "UPDATE items SET frames_done = ? WHERE job_id = ? AND idx = ? AND status = 'running' "
                "AND frames_done < ?",
                (frames_done, claim.job_id, claim.index, frames_done),
            ).rowcount
            if changed:
                db.execute("UPDATE jobs SET updated_at = ? WHERE id = ?", (time.time(), claim.job_id))
            return self._load(db, claim.job_id)

    def work_dir(self, job_id: str, index: int) -> Path:
        return self.files.work_dir(job_id, index)

    def claim_dir(self, claim: Claim) -> Path:
        return self.files.claim_dir(claim.job_id, claim.index, claim.attempt, claim.first_frame)

    def join_clip(self, job: Job) -> Path:
        return self.files.join_clip(job.id, len(job.items))

    def drop_clip(self, job: Job) -> None:
        self.files.drop_clip(job.id, len(job.items))

    def cancel(self, job_id: str, ttl_s: float) -> Job | None:
        with self._tx() as db:
            job = self._load(db, job_id)
            if job is None or job.terminal:
                return job
            db.execute(
                "UPDATE items SET status = 'cancelled', input_bytes = 0 "
                "WHERE job_id = ? AND status = 'queued'",
                (job_id,),
            )
            self._set_job(db, job_id, "cancelled", ttl_s, webhook_state="pending" if job.webhook else "none")
            job = self._load(db, job_id)
        for item in job.items if job else ():
            if item.status == "cancelled":
                self.files.drop_input(job_id, item.index)
        return job

    def fail(self, job_id: str, message: str, ttl_s: float) -> Job | None:
        error = json.dumps({"code": "job_failed", "message": message})
        with self._tx() as db:
            job = self._load(db, job_id)
            if job is None or job.terminal:
                return job
            db.execute(
                "UPDATE items SET status = 'error', error = ?, input_bytes = 0 "
                "WHERE job_id = ? AND status IN ('queued', 'running')",
                (error, job_id),
            )
            self._set_job(
                db, job_id, "failed", ttl_s, error=message, webhook_state="pending" if job.webhook else "none"
            )
            return self._load(db, job_id)

    def delete(self, job_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM jobs WHERE id = ?", (job_id,)).rowcount > 0
        self.files.remove(job_id)
        return gone

    def recover(self) -> int:
        self.files.reset_staging()
        known = {r[0] for r in self._read("SELECT id FROM jobs")}
        self.files.sweep(lambda ids: [i in known for i in ids])
        with self._tx() as db:
            # An item of a job that ended meanwhile (cancelled while it ran) will not run again.
            db.execute(
                "UPDATE items SET status = 'cancelled', input_bytes = 0 WHERE status = 'running' "
                "AND job_id IN (SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled'))"
            )
            return db.execute("UPDATE items SET status = 'queued' WHERE status = 'running'").rowcount

    def expired(self, now: float) -> list[str]:
        placeholders = ", ".join("?" * len(TERMINAL))
        rows = self._read(
            f"SELECT id FROM jobs WHERE status IN ({placeholders}) AND expires_at <= ?",
            (*sorted(TERMINAL), now),
        )
        return [r[0] for r in rows]

    def active_styles(self) -> set[str]:
        rows = self._read("SELECT options FROM jobs WHERE status IN ('queued', 'running')")
        return {ResolvedOptions.load(json.loads(r[0])).style for r in rows}

    def jobs_of_style(self, style: str) -> list[str]:
        rows = self._read("SELECT id, options FROM jobs WHERE status IN ('queued', 'running')")
        return [r[0] for r in rows if ResolvedOptions.load(json.loads(r[1])).style == style]

    def usage(self, account: str | None = None) -> int:
        if account is not None:
            return int(self._read(_ACCOUNT_USAGE_SQL, (account,))[0][0])
        return int(self._read(_USAGE_SQL)[0][0]) + self.files.stray_bytes

    def waiting(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM items WHERE status = 'queued'")[0][0])

    def counts(self) -> dict[str, int]:
        return {status: n for status, n in self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")}

    def set_webhook_state(self, job_id: str, state: WebhookState) -> None:
        with self._tx() as db:
            db.execute("UPDATE jobs SET webhook_state = ? WHERE id = ?", (state, job_id))

    def pending_webhooks(self) -> list[Job]:
        rows = self._read("SELECT id FROM jobs WHERE webhook_state = 'pending'")
        jobs = [self.get(r[0]) for r in rows]
        return [j for j in jobs if j is not None and j.terminal]

    def close(self) -> None:
        with self._lock:
            self._db.close()
