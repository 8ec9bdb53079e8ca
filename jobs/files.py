"""Files that survive a crash: written to a temporary name, fsynced, renamed, the directory fsynced;
and the one layout of a data directory's job files (:class:`JobFiles`), which both stores use.

After :func:`write_durable` returns, the file is on disk under its final name with all its bytes, or
(if the machine died before) not there at all; never half-written under its final name.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, Final

from jobs.errors import JobStoreError
from jobs.model import VIDEO_SUFFIX
from serving.clips import resumable_segments
from serving.video import VideoError, join_segments

_CHUNK = 1 << 20
#: The folder of a video item's claim that holds its segments (:class:`~serving.clips.ClipFlow`'s
#: work folder), beside the claim's result.
SEGMENTS: Final = "segments"

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new, renamed or removed files) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes | BinaryIO) -> int:
    """Write ``data`` (bytes, or a readable binary stream read from its current position) to
    ``path`` atomically and durably; the bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    written = 0
    try:
        with tmp.open("wb") as out:
            if isinstance(data, bytes):
                out.write(data)
                written = len(data)
            else:
                while chunk := data.read(_CHUNK):
                    out.write(chunk)
                    written += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return written


def remove_tree(path: Path) -> None:
    """Delete a directory and everything in it, durably; nothing if it is not there."""
    if not path.exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    if path.parent.exists():
        fsync_dir(path.parent)


def tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _link_or_copy(source: Path, target: Path) -> bool:
    """``target`` made the same complete file as ``source``: a hard link, or (a file system without
    them) a durable copy; False if ``source`` is gone."""
    try:
        os.link(source, target)
    except FileExistsError:
        pass
    except FileNotFoundError:
        return False
    except OSError as exc:  # EPERM, EXDEV, EMLINK, ENOTSUP: no hard link here
        log.debug("jobs: %s cannot be linked (%s); copied", source, exc)
        try:
            with source.open("rb") as data:
                write_durable(target, data)
        except FileNotFoundError:
            return False
    return True


def newest_mtime(path: Path) -> float:
    """The latest modification time in a directory tree (0 if it vanished meanwhile)."""
    newest = 0.0
    for p in (path, *path.rglob("*")):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            continue
    return newest


class JobFiles:
    """The job files of a data directory, laid out the same for both stores:

    * ``jobs/<id>/in/NNNN``: a job's photos, each until its item ends;
    * ``jobs/<id>/out/NNNN.<suffix>``: the results;
    * ``jobs/<id>/work/NNNN/<claim>/``: a video item's finished segments while a claim of it runs
      (``segments/``: what a later claim resumes from, if this one stops), and its result before it
      is moved to ``out/``; one folder per claim (:attr:`~jobs.store.Claim.attempt`), so a runner
      that lost its claim and the one that took it over never write or remove each other's files;
    * ``staging/<id>/`` (``staging/<replica>/<id>/`` for a shared directory): a job being accepted,
      renamed into ``jobs/`` whole once every photo is on disk.

    Everything is written durably (:func:`write_durable`). ``replica`` names this process's own
    staging area when several processes share the directory.
    """

    def __init__(self, data_dir: Path, replica: str | None = None) -> None:
        self.data_dir = data_dir
        self.jobs_dir = data_dir / "jobs"
        self.staging_root = data_dir / "staging"
        self.staging_dir = self.staging_root / replica if replica else self.staging_root
        try:
            self.jobs_dir.mkdir(parents=True, exist_ok=True)
            self.staging_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JobStoreError(f"the job data directory {data_dir} cannot be used: {exc}") from exc
        #: Temporary files found by :meth:`sweep` and left (too recent to be a dead process's).
        self._strays: list[Path] = []
        #: The clips being joined in this process, by job.
        self._joining: dict[str, threading.Lock] = {}

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def input_path(self, job_id: str, index: int) -> Path:
        return self.job_dir(job_id) / "in" / f"{index:04d}"

    def result_path(self, job_id: str, index: int, suffix: str) -> Path:
        return self.job_dir(job_id) / "out" / f"{index:04d}.{suffix}"

    def work_dir(self, job_id: str, index: int) -> Path:
        return self.job_dir(job_id) / "work" / f"{index:04d}"

    def claim_dir(self, job_id: str, index: int, attempt: str, first_frame: int) -> Path:
        """:meth:`JobStore.claim_dir`: the folder ``work/NNNN/<attempt>/``, made, holding hard links
        to the complete segments of the item's earlier claims from frame ``first_frame`` on (the
        longest run of them that one earlier claim left, by the rule a run resumes by:
        :func:`~serving.clips.resumable_segments`); a copy where the file system cannot link. A claim
        that let its folder go meanwhile (it lost its lease) ends what is taken from it there: what
        was linked before stays, as a link outlives the name it was made from. Raises OSError
        (FileNotFoundError when the job's folder is gone: nothing is made for a deleted job)."""
        chunk = self.work_dir(job_id, index)
        chunk.parent.mkdir(exist_ok=True)  # never ``parents``: a deleted job's folder stays gone
        chunk.mkdir(exist_ok=True)
        own = chunk / attempt
        own.mkdir(exist_ok=True)
        # Earlier claims' folders, and the one folder of the item from before claims had their own.
        earlier = [p / SEGMENTS for p in chunk.iterdir() if p.is_dir() and p.name not in (attempt, SEGMENTS)]
        chains = [resumable_segments(folder, first_frame) for folder in [*earlier, chunk / SEGMENTS]]
        chain = max(chains, key=lambda c: c[-1][1] if c else first_frame, default=[])
        if chain:
            segments = own / SEGMENTS
            segments.mkdir(exist_ok=True)
            for _, _, path in chain:
                if not _link_or_copy(path, segments / path.name):
                    break
            fsync_dir(segments)
        fsync_dir(chunk)
        return own

    def clip_path(self, job_id: str) -> Path:
        """A video job's whole clip, joined from its chunks' results."""
        return self.job_dir(job_id) / "out" / f"clip.{VIDEO_SUFFIX}"

    def write_photos(self, job_id: str, photos: Sequence[BinaryIO | int | None]) -> None:
        """Each photo (None: refused at acceptance, not kept; an index: the same file as that
        earlier one's, linked) written durably as ``in/NNNN`` of the job's staging directory, which
        is then renamed into place and the rename fsynced: a job's folder is there whole or not at
        all. Raises JobStoreError, with the staging directory removed."""
        staging = self.staging_dir / job_id
        try:
            for index, stream in enumerate(photos):
                if isinstance(stream, int):
                    os.link(staging / "in" / f"{stream:04d}", staging / "in" / f"{index:04d}")
                elif stream is not None:
                    write_durable(staging / "in" / f"{index:04d}", stream)
            staging.mkdir(parents=True, exist_ok=True)
            staging.rename(self.job_dir(job_id))
            fsync_dir(self.jobs_dir)
        except OSError as exc:
            remove_tree(staging)
            raise JobStoreError(f"cannot write the job's photos under {self.data_dir}: {exc}") from exc

    def write_result(self, job_id: str, index: int, suffix: str, data: bytes | Path) -> int | None:
        """The result written under its final name (before its item is recorded: a crash in between
        runs the item again, which writes the same file); its bytes, or None if the job's folder is
        gone (deleted while its item ran). ``data`` as bytes, or a complete file on the same file
        system (a clip's), moved into place durably."""
        if not self.job_dir(job_id).exists():
            return None
        path = self.result_path(job_id, index, suffix)
        if isinstance(data, bytes):
            return write_durable(path, data)
        with data.open("rb") as done:
            os.fsync(done.fileno())
        path.parent.mkdir(parents=True, exist_ok=True)
        data.replace(path)
        fsync_dir(path.parent)
        return path.stat().st_size

    def try_write_result(
        self, job_id: str, index: int, suffix: str, data: bytes | Path
    ) -> tuple[int | None, dict[str, str] | None]:
        """:meth:`write_result`, and a failure to write (a full or failing disk) turned into the
        item's error: ``(bytes written or None, None)``, or ``(0, error)`` with nothing left behind.
        The item then ends in error with it, and its job settles, instead of staying running."""
        try:
            return self.write_result(job_id, index, suffix, data), None
        except OSError as exc:
            log.error("jobs: the result of item %d of job %s could not be written: %s", index, job_id, exc)
            full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            reason = exc.strerror or type(exc).__name__
            return 0, {
                "code": "insufficient_storage" if full else "internal_error",
                "message": f"the result could not be written to the job storage ({reason}); send "
                "the photo again in a new job",
            }

    def join_clip(self, job_id: str, chunks: int) -> Path:
        """:meth:`JobStore.join_clip` on the files: the chunks' results (``out/NNNN.mp4``) joined with
        the audio of the clip (``in/0000``) into :meth:`clip_path`, durably; then the clip's links
        and the chunks' results are removed. One join at a time in this process (a player's several
        Range requests wait for the first); two replicas joining at once write the same file. Audio
        that cannot be read (damaged while the video is not) is left out, with a warning, rather than
        costing the clip."""
        with self._joining.setdefault(job_id, threading.Lock()):
            final = self.clip_path(job_id)
            if not final.exists():
                self._join(job_id, chunks, final)
            self._drop_chunks(job_id, chunks)  # also after a crash between the rename and this
        self._joining.pop(job_id, None)
        return final

    def _join(self, job_id: str, chunks: int, final: Path) -> None:
        chunks_out = [self.result_path(job_id, i, VIDEO_SUFFIX) for i in range(chunks)]
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex}.tmp")
        try:
            try:
                join_segments(chunks_out, tmp, self.input_path(job_id, 0))
            except VideoError as exc:  # the clip's audio, not our chunks: join them without it
                log.warning("jobs: the clip of job %s is joined without its audio: %s", job_id, exc)
                tmp.unlink(missing_ok=True)
                join_segments(chunks_out, tmp, None)
            with tmp.open("rb") as done:
                os.fsync(done.fileno())
            tmp.replace(final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            if final.exists():  # another replica joined it meanwhile (and removed the chunks)
                return
            raise
        fsync_dir(final.parent)

    def _drop_chunks(self, job_id: str, chunks: int) -> None:
        for index in range(chunks):
            self.input_path(job_id, index).unlink(missing_ok=True)
            self.result_path(job_id, index, VIDEO_SUFFIX).unlink(missing_ok=True)
        remove_tree(self.job_dir(job_id) / "work")
        out = self.job_dir(job_id) / "out"
        if out.exists():
            fsync_dir(out)

    def drop_clip(self, job_id: str, chunks: int) -> None:
        """A video job that ended without its clip (cancelled, failed, a chunk in error): the clip's
        links and the chunks' work folders go now (they count nowhere once the chunks have ended);
        the chunks' results stay, counted, until the job expires."""
        for index in range(chunks):
            self.drop_input(job_id, index)
        remove_tree(self.job_dir(job_id) / "work")

    def drop_input(self, job_id: str, index: int, *, keep_input: bool = False) -> None:
        """An item's photo (or clip, unless ``keep_input``), and its work folder (every claim's in
        it), once its item has ended (its record says so first)."""
        if not keep_input:
            self.input_path(job_id, index).unlink(missing_ok=True)
        work = self.work_dir(job_id, index)
        if work.exists():
            remove_tree(work)

    def remove(self, job_id: str) -> None:
        """A job's folder, with everything in it."""
        remove_tree(self.job_dir(job_id))

    def reset_staging(self) -> None:
        """Empty this process's staging area (what a dead process of the same name left there)."""
        remove_tree(self.staging_dir)
        self.staging_dir.mkdir(parents=True, exist_ok=True)

    @property
    def stray_bytes(self) -> int:
        """Bytes of the temporary files :meth:`sweep` left in job folders, while they are there (the
        quota counts them: a dead writer's half-written result takes room until it is removed)."""
        total, left = 0, []
        for path in self._strays:
            try:
                total += path.stat().st_size
            except OSError:
                continue
            left.append(path)
        self._strays = left
        return total

    def sweep(self, recorded: Callable[[list[str]], list[bool]], untouched_s: float = 0.0) -> None:
        """Remove the job folders without a record (renamed into place, but the record never came),
        other processes' staging directories, and the temporary files of writes that never finished
        (:func:`write_durable` killed between its write and its rename), all untouched for
        ``untouched_s`` seconds (0: now; on a shared directory, long enough that no upload or write
        is still in progress; younger temporary files are counted in :attr:`stray_bytes`).
        ``recorded(ids)`` says, for each id, whether the store has its job."""
        cutoff = time.time() - untouched_s
        strays = []
        for tmp in self.jobs_dir.glob("*/*/.*.tmp"):
            try:
                if tmp.stat().st_mtime <= cutoff:
                    tmp.unlink()
                else:
                    strays.append(tmp)
            except OSError:
                continue
        self._strays = strays
        others = [] if self.staging_dir == self.staging_root else list(self.staging_root.iterdir())
        for path in others:
            if path.is_dir() and path != self.staging_dir and newest_mtime(path) <= cutoff:
                remove_tree(path)
        folders = [p for p in self.jobs_dir.iterdir() if p.is_dir()]
        if not folders:
            return
        for path, known in zip(folders, recorded([p.name for p in folders]), strict=True):
            if not known and (untouched_s == 0 or newest_mtime(path) <= cutoff):
                remove_tree(path)
