"""Choosing the job store from the settings (nothing here talks to Redis)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from jobs.redis import RedisJobStore
from jobs.sqlite import SQLiteJobStore
from service.jobs import build_job_store
from service.settings import Settings


def test_the_backend_named_is_built(tmp_path: Path) -> None:
    store = build_job_store(Settings.model_validate({"data_dir": tmp_path / "a"}))
    assert isinstance(store, SQLiteJobStore)
    store.close()
    settings = Settings.model_validate(
        {
            "data_dir": tmp_path / "b",
            "jobs_backend": "redis",
            "redis_url": "redis://:pw@redis.internal:6380/2",
            "job_lease_s": 30,
        }
    )
    store = build_job_store(settings)
    assert isinstance(store, RedisJobStore) and store.lease_s == 30 and store.data_dir == tmp_path / "b"
    assert store.url == "redis://:***@redis.internal:6380/2"
    store.close()


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("jobs_backend", "postgres", "'sqlite' or 'redis'"),
        ("redis_url", "http://localhost:6379", "not a Redis URL"),
        ("redis_url", "localhost:6379", "not a Redis URL"),
        ("job_lease_s", 1, "greater than or equal to 2"),
    ],
)
def test_bad_backend_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings.model_validate({field: value})
