"""Giving memory back: glibc's arena cap and trim are reachable here (Linux, glibc)."""

from __future__ import annotations

import platform

import pytest

from service import memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_arena_cap_and_trim_work_on_glibc() -> None:
    assert memory.limit_arenas(2) is True
    assert memory.limit_arenas(0) is False  # 0 keeps glibc's default: nothing is called
    blob = [bytearray(1 << 20) for _ in range(64)]  # 64 MiB in many blocks, then freed
    del blob
    assert isinstance(memory.trim(), bool)
