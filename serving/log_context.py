"""What every log line of the work in hand says it belongs to: the request (its id) and the client.

The HTTP middleware sets both for a request; the job runner sets them for each job item (the request
id is then ``job:<id>:<index>``) and each webhook delivery (``job:<id>:webhook``), so the lines of a
job's work name the job and its client like a request's lines do. The log formatter reads them.
Context variables: set in a task, they hold for that task and the threads it hands work to with
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager

#: The current request's id (or the job item's), for log records.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: The current client's name (its API key's name, or anonymous), for log records.
client_var: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="-")


@contextmanager
def log_context(request_id: str, client: str) -> Iterator[None]:
    """Log lines in this block (and in what it hands to threads) carry ``request_id`` and ``client``."""
    rid, who = request_id_var.set(request_id), client_var.set(client)
    try:
        yield
    finally:
        client_var.reset(who)
        request_id_var.reset(rid)


def task_context(request_id: str, client: str) -> contextvars.Context:
    """A copy of the current context in which log lines carry ``request_id`` and ``client``: for a
    task of its own (``asyncio.create_task(..., context=task_context(...))``)."""
    context = contextvars.copy_context()
    context.run(request_id_var.set, request_id)
    context.run(client_var.set, client)
    return context
