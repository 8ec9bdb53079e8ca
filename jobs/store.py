"""The job store interface: job records and the photos and results that belong to them.

Two backends implement it: :class:`jobs.sqlite.SQLiteJobStore` (embedded, the default: SQLite in WAL
mode plus files, on a local data directory) and :class:`jobs.redis.RedisJobStore` (shared by several
replicas: Redis plus files on a directory every replica mounts). Both keep files
under ``<data_dir>/jobs/<job id>/`` (``in/<index>`` the photos, ``out/<index>.<suffix>`` the results),
written durably (:mod:`jobs.files`); a job is recorded only once all its photos are on disk, so an
accepted job survives ``kill -9``.

Work is handed out by :meth:`JobStore.claim`: clients (who handed the jobs in) take turns, and each
client's next item is the oldest queued item of its oldest unfinished job whose style can run here.
An item that was claimed and never finished (its process died) goes back to the queue: at start-up
for the embedded store, after its lease for a shared one. Finishing an item is idempotent per (job,
index): a result written twice replaces itself, so a job never holds two results for one photo.

Storage is bounded: every photo counts from acceptance until its item ends; every result counts
from acceptance as the reservation decided on arrival (:mod:`serving.reservation`), then as its real
size. :meth:`JobStore.usage` is the sum, plus the temporary files of writes cut short by a crash until
they are swept; a job that would take it over the quota is refused before anything is written. A job
also counts against its *account* (whose share of the storage it uses: a key's client, or an address
without keys), and a job that would take its account over the account's quota is refused the same way,
so one client cannot fill the storage for the others. A result that cannot be written (a full or
failing disk) ends its item in error (:meth:`JobFiles.try_write_result`), and the job settles.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from jobs.errors import StorageQuotaError
from jobs.model import ItemStatus, Job, WebhookState, result_suffix
from serving.options import ResolvedOptions
from serving.tickets import ANONYMOUS
from serving.tracing import TraceContext


@dataclass(frozen=True)
class Upload:
    """A photo handed in with a job."""

    filename: str
    #: Its bytes, read from the current position; None when it was refused at acceptance.
    stream: BinaryIO | None
    size: int
    #: ``{"code", "message"}`` when refused at acceptance (the item starts as ``error``).
    error: dict[str, str] | None
    #: Upper bound of its result's size, reserved until the result is written.
    estimate: int
    #: A chunk of a clip: its frame count (its item is then a video item; None for a photo) and its
    #: first frame's place in the clip.
    frames: int | None = None
    first_frame: int = 0
    #: A chunk after the first: its bytes are the first chunk's upload (a link to its file, not a
    #: copy); ``stream`` is None. ``size`` is its share of the clip's bytes.
    same_as: int | None = None


@dataclass(frozen=True)
class Claim:
    """An item handed to a runner."""

    job_id: str
    index: int
    filename: str
    options: ResolvedOptions
    input_path: Path
    #: Who holds it (a runner's id), for shared stores with leases.
    owner: str
    #: The shared store's handle of this hand-out (its stream entry); empty for the embedded store.
    token: str = ""
    #: The client whose job it is (the worker shares its time fairly between clients).
    client: str = ANONYMOUS
    #: The shared store's queue the item came from (its style and client); empty for the embedded store.
    queue: str = ""
    #: The span of the request that made its job (its work is a span of that trace).
    trace: TraceContext | None = None
    #: A video item's frames and its first frame's place in the clip (None: a photo).
    frames: int | None = None
    first_frame: int = 0
    #: This hand-out of the item, unique (a new one each time it is handed out, even to the same
    #: runner again): a video item's claim works in a folder of its own (:meth:`JobStore.claim_dir`),
    #: so two holders of one chunk (one that lost its lease and one that took it over) never share one.
    attempt: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def suffix(self) -> str:
        """Its result's file suffix."""
        return result_suffix(self.options, self.frames)


class JobStore(Protocol):
    data_dir: Path

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
        """Store a new job of ``client`` (made in ``trace``) and its photos durably; ``(job, True)``. With an
        ``idempotency_key`` that is already known: ``(that job, False)`` and nothing is stored.
        Its bytes count against the total ``quota_bytes`` and, when ``account`` is given, against
        that account's ``account_quota_bytes`` (a client's own share of the storage). Raises
        StorageQuotaError."""
        ...

    def get(self, job_id: str) -> Job | None: ...

    def by_idempotency_key(self, key: str) -> Job | None: ...

    def recent(self, status: str | None, limit: int, client: str | None = None) -> list[Job]:
        """The most recent jobs first, optionally of one status, optionally of one client."""
        ...

    def claim(self, styles: Collection[str], owner: str) -> Claim | None:
        """The next item to run among jobs whose style is in ``styles``, marked running; None if none.
        Clients take turns (start-time fair queuing by item): one client's long job does not hold
        back another client's short one; a client's own items come oldest job first."""
        ...

    def renew(self, claim: Claim) -> bool:
        """Extend a claim's lease (shared stores); False if it was lost to another runner."""
        ...

    def release(self, claim: Claim) -> None:
        """Give an unfinished claim back to the queue (shutdown, or its style went away)."""
        ...

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
        """Record how an item ended (``ok`` with its result, ``error``, ``cancelled``), ending the job
        when it was the last; the job, or None if it is gone (deleted meanwhile). ``result``: the
        bytes, or a complete file (a clip's, in its :meth:`claim_dir`) moved into place."""
        ...

    def progress(self, claim: Claim, frames_done: int) -> Job | None:
        """A running video item has written ``frames_done`` of its frames: recorded (never going back)
        while the claim holds the item; the job, or None if it is gone."""
        ...

    def join_clip(self, job: Job) -> Path:
        """A video job whose chunks are all ``ok``: its whole clip, joined once (the chunks' results
        with the clip's audio, written under a temporary name and renamed), after which the clip and
        the chunks' files go; the path. Idempotent: the joined clip when it is there already.
        Raises :class:`~serving.video.VideoEncodeError`."""
        ...

    def drop_clip(self, job: Job) -> None:
        """A video job that has ended without its clip (cancelled, failed, a chunk in error): the
        clip's file and the chunks' work folders are removed."""
        ...

    def work_dir(self, job_id: str, index: int) -> Path:
        """Where a video item's claims keep their finished segments while they run, each in a folder
        of its own (:meth:`claim_dir`); shared by replicas with the data directory. It goes when the
        item ends (the holder that records its end removes it) or its job is let go."""
        ...

    def claim_dir(self, claim: Claim) -> Path:
        """A video item's claim's own folder in the item's :meth:`work_dir`, made: its run keeps its
        segments in ``segments/`` (:data:`jobs.files.SEGMENTS`) and writes its result beside them. The
        complete segments that earlier claims of the item left in theirs (a run stopped by ``kill -9``,
        a shutdown, a lost lease) are linked into it first, so the run resumes after the last of them.
        Raises OSError (FileNotFoundError when the job's folder is gone)."""
        ...

    def cancel(self, job_id: str, ttl_s: float) -> Job | None:
        """Cancel what has not run (queued items); the job becomes ``cancelled``."""
        ...

    def fail(self, job_id: str, message: str, ttl_s: float) -> Job | None:
        """The job cannot run: ``failed`` with ``message``; its queued items end in error."""
        ...

    def delete(self, job_id: str) -> bool:
        """Remove the job's record and files; False if there was none."""
        ...

    def recover(self) -> int:
        """At start-up: items left running by a dead process go back to the queue; the count."""
        ...

    def expired(self, now: float) -> list[str]:
        """Ended jobs whose ``expires_at`` has passed."""
        ...

    def active_styles(self) -> set[str]:
        """Styles of the jobs that still have items to run."""
        ...

    def jobs_of_style(self, style: str) -> list[str]:
        """Unfinished jobs of a style (to fail them when the style is not configured here)."""
        ...

    def usage(self, account: str | None = None) -> int:
        """Bytes used or reserved by every stored job, or by the jobs of one ``account``."""
        ...

    def waiting(self) -> int:
        """Items queued, in all jobs."""
        ...

    def counts(self) -> dict[str, int]:
        """Jobs by status."""
        ...

    def set_webhook_state(self, job_id: str, state: WebhookState) -> None: ...

    def pending_webhooks(self) -> list[Job]:
        """Ended jobs whose webhook has not been delivered (nor given up on) yet."""
        ...

    def result_path(self, job_id: str, index: int, suffix: str) -> Path: ...

    def close(self) -> None: ...


def quota_message(needed: int, used: int, quota: int, *, own: bool = False) -> str:
    """What a :class:`~jobs.errors.StorageQuotaError` says: what the job needs, what is free, of the
    whole job storage or (``own``) of the client's share of it."""
    mib = 1024 * 1024
    free = f"{max(0, quota - used) / mib:.1f} MiB"
    if own:
        return (
            f"the job needs {needed / mib:.1f} MiB (its photos and room for their results) but your "
            f"jobs already hold {used / mib:.1f} MiB of your {quota / mib:.1f} MiB share of the job "
            f"storage ({free} free); wait for your older jobs to expire, delete finished ones, or ask "
            "for a larger share (TOONSERVE_CLIENT_JOB_STORAGE_BYTES, or job_storage_bytes= for your key)"
        )
    return (
        f"the job needs {needed / mib:.1f} MiB (its photos and room for their results) but only "
        f"{free} of the {quota / mib:.0f} MiB job storage is free; "
        "wait for older jobs to expire, delete finished ones, or raise TOONSERVE_MAX_JOB_STORAGE_BYTES"
    )


def check_room(
    needed: int, used: int, quota: int, account_used: int = 0, account_quota: int | None = None
) -> None:
    """StorageQuotaError unless ``needed`` more bytes fit in the account's share and in the whole."""
    if account_quota is not None and account_used + needed > account_quota:
        raise StorageQuotaError(quota_message(needed, account_used, account_quota, own=True))
    if used + needed > quota:
        raise StorageQuotaError(quota_message(needed, used, quota))


def existing_or_needed(
    store: JobStore,
    uploads: list[Upload],
    idempotency_key: str | None,
    quota_bytes: int,
    account: str = "",
    account_quota_bytes: int | None = None,
) -> tuple[Job | None, int, int | None]:
    """What both stores decide before they write a job: the job an idempotency key already made
    (then nothing else is done), or the bytes the new one needs, refused at once
    (:class:`~jobs.errors.StorageQuotaError`) if the storage, or the account's share of it, has no
    room for them; and the account's quota (None without an account). Each store decides the room
    again atomically when it records the job."""
    if idempotency_key is not None:
        existing = store.by_idempotency_key(idempotency_key)
        if existing is not None:
            return existing, 0, None
    needed = sum(u.size + u.estimate for u in uploads if u.error is None)
    quota = account_quota_bytes if account else None
    check_room(needed, store.usage(), quota_bytes, store.usage(account) if quota is not None else 0, quota)
    return None, needed, quota


def accepted_streams(uploads: list[Upload]) -> list[BinaryIO | int | None]:
    """Each upload's bytes to keep, the index of the upload whose file it shares (a clip's chunk), or
    None for those refused at acceptance (:meth:`JobFiles.write_photos`)."""
    return [(u.stream if u.same_as is None else u.same_as) if u.error is None else None for u in uploads]
