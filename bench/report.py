"""The one way a benchmark keeps its figures: a JSON file (under ``bench/results/`` by default) and a
line saying where."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_report(path: Path, report: Any) -> Path:
    """``report`` as indented JSON at ``path`` (folders made); says so on stdout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str))
    print(f"# wrote {path}")
    return path
