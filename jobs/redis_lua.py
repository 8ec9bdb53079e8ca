"""The Lua scripts of :mod:`jobs.redis`, loaded by name from ``jobs/lua/<name>.lua``: every change that
must check and write atomically across replicas. Each script is ``_prelude.lua`` (key names and the
transitions that keep the counters and indexes right) followed by its own text; the first lines of
each file say its arguments and what it returns.

Redis runs a script as one command (nothing else interleaves), so each script is a transaction. Keys
are derived inside the scripts from the prefix (``ARGV[1]``) and the records they read, because the
stream entry a runner is handed decides which job and item it touches; all keys share one hash tag.

Each script may run twice when a client retries after a lost reply: the second run finds the change
made and does nothing (a job that exists, an entry no longer held, a job that has ended), except
``CLAIM``, whose second run claims another item; the first one's item then waits out its lease.

Layout (``P`` is ``{prefix}:``):

* ``P job:<id>`` (hash): ``status``, ``options`` (JSON), ``style``, ``client`` (who handed it in),
  ``queue`` (``<style>:<client>``), ``created_at``, ``updated_at``, ``expires_at``, ``webhook``,
  ``webhook_state``, ``idempotency_key``, ``error`` (``""`` for none), ``left`` (items not ended),
  ``bytes`` (what the job holds in the usage counter);
* ``P items:<id>`` (hash): item index → JSON (``filename``, ``status``, ``error``, ``faces_stylized``,
  ``timings_ms``, ``input_bytes``, ``result_bytes``, ``estimate``, ``frames``, ``first_frame`` and
  ``frames_done`` (a video chunk's frame count, null for a photo, its first frame's place in the
  clip, and how many are written), plus ``entry``: the id of the
  item's current stream entry while it is queued or running, and ``owner``);
* ``P queue:<style>:<client>`` (stream, consumer group ``runners``): one entry per queued item
  (``job``, ``index``); an entry is pending (leased) while its item runs, acked and deleted when the
  item ends or goes back to the queue (as a new entry). One stream per style and client, so that
  clients take turns (jobs stored before there were clients are in ``P queue:<style>``);
* ``P idem:<key>`` (string): the job an idempotency key made;
* ``P usage``, ``P waiting`` (integers): bytes used or reserved by every job; items queued;
* ``P created``, ``P status:<status>``, ``P client:<client>`` (sorted sets by ``created_at``),
  ``P expiry`` (ended jobs by ``expires_at``), ``P webhooks`` (set: jobs whose webhook is pending),
  ``P styles`` (set: the queues, ``<style>:<client>``, that have a stream);
* ``P vtime`` (float), ``P finish`` (hash: client → float): whose turn it is (start-time fair queuing
  by item: a client's next item starts at the later of ``vtime`` and its ``finish``, the smallest
  start goes first).
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Final

#: The scripts, by the name :mod:`jobs.redis` runs them under (``CLAIM`` is ``lua/claim.lua``).
NAMES: Final = (
    "CREATE",
    "CLAIM",
    "RENEW",
    "FINISH",
    "PROGRESS",
    "RELEASE",
    "CANCEL",
    "FAIL",
    "DELETE",
    "SET_WEBHOOK_STATE",
    "PRUNE_CONSUMERS",
)


@functools.cache
def script(name: str) -> str:
    """The Lua source of script ``name`` (one of :data:`NAMES`), the prelude first."""
    if name not in NAMES:
        raise KeyError(f"no Lua script {name!r}; there are {', '.join(NAMES)}")
    folder = files("jobs") / "lua"
    return (folder / "_prelude.lua").read_text() + (folder / f"{name.lower()}.lua").read_text()
