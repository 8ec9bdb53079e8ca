"""Giving memory back: glibc's arena cap and trim work here (Linux, glibc), and the trim policy."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

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


#: Run in a fresh interpreter: how a buffer comes back depends on the heap's history, which a test
#: process that has run other tests has plenty of (freed holes in mid-heap are reused whatever the
#: thresholds).
_BUFFERS = """
import ctypes, json, os, resource, sys
from service import memory

def faults(count, size):
    bytearray(size)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(count):
        buffer = bytearray(size)  # zero-filled: every page is touched
        del buffer
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

libc = memory._libc()
for param in (memory._M_MMAP_THRESHOLD, memory._M_TRIM_THRESHOLD):
    assert libc.mallopt(ctypes.c_int(param), ctypes.c_int(128 << 10))  # glibc's start values
start = faults(20, 8 << 20)
unset = memory.keep_buffers(0)
kept = memory.keep_buffers(memory.MAX_MMAP_THRESHOLD_MIB)
print(json.dumps(dict(start=start, unset=unset, kept=kept, faults=faults(20, 8 << 20))))
"""


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_kept_buffers_are_reused_instead_of_faulted_in_again() -> None:
    """An 8 MiB buffer allocated and freed 20 times. With glibc's thresholds at their start values
    (where they stayed in a service running int8 on ONNX Runtime) each one is mapped afresh and its
    pages faulted in, zeroed, every time; with the service's setting they come back from the heap."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", _BUFFERS], cwd=root, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    pages = (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert seen["start"] >= 10 * pages, seen
    assert seen["unset"] is False  # 0 leaves glibc's thresholds: nothing is called
    assert seen["kept"] is True
    assert seen["faults"] < pages, f"{seen['faults']} page faults for 20 buffers of {pages} pages"


def test_trim_policy() -> None:
    policy = memory.TrimPolicy(last_trim=0.0, busy_every_s=30.0)
    assert not policy.due(5.0, idle=True, batches_done=0)  # no work since the start: nothing to give back
    # Idle at this look, but batches finished since the last: photo after photo, caught between two.
    assert not policy.due(10.0, idle=True, batches_done=3)
    assert policy.due(15.0, idle=True, batches_done=3)  # a whole look without work: the pause
    assert not policy.due(20.0, idle=True, batches_done=3)  # and not again without work
    # Working without a pause, idle or not at the looks: every busy_every_s, not on every look.
    assert not policy.due(25.0, idle=False, batches_done=9)
    assert not policy.due(30.0, idle=True, batches_done=14)
    assert not policy.due(40.0, idle=True, batches_done=20)
    assert policy.due(46.0, idle=False, batches_done=21)
    assert not policy.due(50.0, idle=True, batches_done=30)
    assert policy.due(55.0, idle=True, batches_done=30)  # the pause comes: trimmed at the next look
