"""Giving memory back: glibc's arena cap and trim work here (Linux, glibc), and the trim policy."""

from __future__ import annotations

import os
import platform

import pytest

from service import memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_arena_cap_and_trim_work_on_glibc() -> None:
    assert memory.limit_arenas(2) is True
    assert memory.limit_arenas(0) is False  # 0 keeps glibc's default: nothing is called
    # 256 MiB in 16 KiB blocks (malloc's heap, not mmap), one block in 64 kept: freeing the rest leaves
    # the pages with the process, pinned between the kept blocks, until trim gives them back.
    blocks = [bytearray(16 << 10) for _ in range(16 << 10)]
    kept = blocks[::64]
    del blocks
    before = _rss_mib()
    assert memory.trim() is True
    assert before - _rss_mib() > 128, "malloc_trim gave back less than half of what was freed"
    del kept


def test_trim_policy() -> None:
    policy = memory.TrimPolicy(last_trim=0.0, busy_every_s=30.0)
    assert not policy.due(10.0, idle=True, batches_done=0)  # no work since the start: nothing to give back
    assert policy.due(11.0, idle=True, batches_done=3)  # idle after work
    assert not policy.due(12.0, idle=True, batches_done=3)  # and not again without work
    # Working without a pause: every busy_every_s, not on every look.
    assert not policy.due(20.0, idle=False, batches_done=9)
    assert not policy.due(40.0, idle=False, batches_done=20)
    assert policy.due(41.0, idle=False, batches_done=21)
    assert not policy.due(60.0, idle=False, batches_done=30)
    assert policy.due(61.0, idle=True, batches_done=31)  # the pause comes: trimmed at once
