"""Errors of the jobs package (mapped to HTTP statuses in ``api/errors.py`` like every domain error)."""

from __future__ import annotations

from inference.errors import ToonserveError


class JobsError(ToonserveError):
    """Base class of the errors raised on purpose by ``jobs/``."""


class JobNotFoundError(JobsError):
    """No job (or no item) of that id: never created, expired, or deleted."""


class ResultNotReadyError(JobsError):
    """The item has no result (yet, or at all: it is queued, running, failed or cancelled)."""


class StorageQuotaError(JobsError):
    """Accepting the job would take the job storage over its quota."""


class WebhookRefusedError(JobsError):
    """A webhook URL that is not allowed (scheme, or an address in a private range)."""


class JobStoreError(JobsError):
    """The job store cannot be used (its directory or database is unusable, or Redis is unreachable)."""
