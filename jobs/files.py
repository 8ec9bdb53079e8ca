"""Files that survive a crash: written to a temporary name, fsynced, renamed, the directory fsynced.

After :func:`write_durable` returns, the file is on disk under its final name with all its bytes, or
(if the machine died before) not there at all; never half-written under its final name.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import BinaryIO

_CHUNK = 1 << 20


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
