"""Logging set-up: JSON lines (default) or plain text, each record carrying the request id."""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Final

from api.middleware import client_var, request_id_var

_EXTRA_KEYS: Final = ("method", "path", "status", "duration_ms")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
            "client": client_var.get(),
        }
        for key in _EXTRA_KEYS:
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        record.client = client_var.get()
        return True


def configure(level: str, fmt: str) -> None:
    """Root logging for the service; uvicorn's own access log is replaced by ours (with request ids)."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s %(client)s] %(message)s")
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
        get_logger().handlers[:] = [handler]
