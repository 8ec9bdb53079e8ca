"""What every log line of the work in hand says it belongs to: the request (its id), the client and
the trace (:mod:`serving.tracing`: the W3C trace id and this work's span id).

The HTTP middleware sets them for a request; the job runner sets them for each job item (the request
id is then ``job:<id>:<index>``) and each webhook delivery (``job:<id>:webhook``), in the trace of the
``POST /jobs`` that made the job, so the lines of a job's work name the job, its client and its
trace like a request's lines do. The log formatter reads them.
Context variables: set in a task, they hold for that task and the threads it hands work to with
``asyncio.to_thread``.
"""

from __future__ import annotations

import contextvars

from serving.tracing import TraceContext

#: The current request's id (or the job item's), for log records.
request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
#: The current client's name (its API key's name, or anonymous), for log records.
client_var: contextvars.ContextVar[str] = contextvars.ContextVar("client", default="-")
#: The current work's span in its trace (None: work of no request, such as start-up).
trace_var: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("trace", default=None)


def task_context(request_id: str, client: str, trace: TraceContext | None = None) -> contextvars.Context:
    """A copy of the current context in which log lines carry ``request_id``, ``client`` and
    ``trace``: for a task of its own (``asyncio.create_task(..., context=task_context(...))``)."""
    context = contextvars.copy_context()
    context.run(request_id_var.set, request_id)
    context.run(client_var.set, client)
    context.run(trace_var.set, trace)
    return context
