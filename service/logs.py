"""Logging set-up: JSON lines (default) or plain text, each record carrying the request id."""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any, Final

from serving.log_context import client_var, request_id_var, trace_var

_EXTRA_KEYS: Final = ("method", "path", "status", "duration_ms")
#: Characters a log line never carries raw (a request path is decoded from %0A, %1B…): C0 and C1
#: controls, DEL and the Unicode line and paragraph separators. A path with them could otherwise
#: forge a line of its own, or send escape codes to whoever reads the log in a terminal.
_ESCAPED: Final = {
    **{c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
    0x2028: "\\u2028",
    0x2029: "\\u2029",
}


def escape(text: str) -> str:
    """``text`` with every control character written as an escape (``\\n``, ``\\x1b``…)."""
    return text.translate(_ESCAPED)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": escape(record.getMessage()),
            "request_id": request_id_var.get(),
            "client": client_var.get(),
        }
        trace = trace_var.get()
        if trace is not None:
            entry["trace_id"], entry["span_id"] = trace.trace_id, trace.span_id
        for key in _EXTRA_KEYS:
            if hasattr(record, key):
                value = getattr(record, key)
                entry[key] = escape(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """One plain-text line per record; what the record says is escaped (:func:`escape`), so a line is
    always one line. A traceback after it is the server's own and stays as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = copy.copy(record)
        shown.message = escape(record.message)
        return super().formatMessage(shown)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.client = client_var.get()
        trace = trace_var.get()
        record.trace = f"{trace.trace_id}/{trace.span_id}" if trace is not None else "-"
        return True


def configure(level: str, fmt: str) -> None:
    """Root logging for the service; uvicorn's own access log is replaced by ours (with request ids)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            TextFormatter(
                "%(asctime)s %(levelname)s %(name)s [%(request_id)s %(client)s %(trace)s] %(message)s"
            )
        )
    handler.addFilter(_RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True
    _adopt_modelscope(handler)


def _adopt_modelscope(handler: logging.Handler) -> None:
    """ModelScope's packages (weight downloads) log through their own loggers, ``modelscope`` and
    ``modelscope_hub``, which they set up on first use with their own stderr handler and format and
    with propagation off (``modelscope`` again at every ``get_logger`` call). Set them up now and give
    them our handler instead, so their lines come out in the service's format."""
    from importlib import import_module

    for module in ("modelscope.utils.logger", "modelscope_hub.utils.logger"):
        try:
            get_logger = import_module(module).get_logger
        except (ImportError, AttributeError):  # pragma: no cover - an older or newer modelscope
            continue
        logger = get_logger()
        logger.handlers[:] = [handler]
        # Our handler is on the root logger too: a line must not reach it twice (ModelScope turns
        # propagation off only the first time it sets its logger up).
        logger.propagate = False
