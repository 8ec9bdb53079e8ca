"""The deployment files' ``TOONSERVE_*`` variables against ``service.settings.Settings``.

docker-compose.yml and deploy/kubernetes/ set the Redis job backend's variables, which a parallel
change adds to the settings. Until a name is a field of ``Settings`` it is accepted here; once it is
a field, it is checked like every other (name and value), with no change to this file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from service.settings import Settings

PREFIX = "TOONSERVE_"

#: Fields the Redis job backend brings (TOONSERVE_JOBS_BACKEND, TOONSERVE_REDIS_URL,
#: TOONSERVE_JOB_LEASE_S); this set can go once service/settings.py has them.
PENDING: frozenset[str] = frozenset({"jobs_backend", "redis_url", "job_lease_s"})


def field_name(variable: str) -> str:
    return variable.removeprefix(PREFIX).lower()


def unknown_settings(variables: Iterable[str]) -> list[str]:
    """The ``TOONSERVE_*`` names among ``variables`` that are neither fields nor pending ones."""
    fields = set(Settings.model_fields)
    return sorted(
        v
        for v in variables
        if v.startswith(PREFIX) and field_name(v) not in fields and field_name(v) not in PENDING
    )


def settings_from(env: Mapping[str, str]) -> Settings:
    """``Settings`` built from the ``TOONSERVE_*`` values of ``env`` (a typo'd style, dtype or number
    fails here); pending names that are not fields yet are left out."""
    values = {
        field_name(k): v
        for k, v in env.items()
        if k.startswith(PREFIX) and field_name(k) in Settings.model_fields
    }
    # Validated from these values alone: neither the environment nor a .env file is read.
    return Settings.model_validate(values)
