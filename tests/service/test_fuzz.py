"""The OpenAPI schema, fuzzed against a live service: every operation, every check, a fixed seed.

Schemathesis generates requests from the schema (valid ones and broken ones) for about a minute and
checks every answer: no server error, statuses and bodies and headers as documented, broken
requests refused, valid ones accepted (see tests/schemathesis.toml for the one allowance: a photo's
content cannot be described by a schema). The run fails on any finding.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from devkit.reference_graphs import ReferenceModelDir
from devkit.serve import LiveService, service_env

pytestmark = [pytest.mark.live, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[1] / "schemathesis.toml"
#: Seconds schemathesis may spend generating and sending requests.
BUDGET_S = 60


@pytest.fixture
def fuzzed(model_dir: ReferenceModelDir, tmp_path: Path) -> Iterator[LiveService]:
    env = service_env(
        model_dir.path.parent,
        tmp_path,
        # Small photos keep each generated request cheap; webhooks can then be accepted on loopback.
        TOONSERVE_PROCESSING_SIZE="128",
        TOONSERVE_WEBHOOK_SECRET="fuzz",
        TOONSERVE_WEBHOOK_ALLOW_PRIVATE="true",
    )
    with LiveService(env, tmp_path / "server.log") as svc:
        yield svc


def test_schemathesis_finds_nothing(fuzzed: LiveService, tmp_path: Path) -> None:
    cli = Path(sys.executable).with_name("schemathesis")
    done = subprocess.run(
        [
            str(cli),
            "--config-file",
            str(CONFIG),
            "run",
            f"{fuzzed.url}/openapi.json",
            "--checks",
            "all",
            "--seed",
            "1",
            "--max-time",
            str(BUDGET_S),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=BUDGET_S * 4,
    )
    report = done.stdout[-6000:] + done.stderr[-2000:]
    assert done.returncode == 0, report
    assert " passed" in done.stdout and "failure" not in done.stdout.split("SUMMARY")[-1].lower(), report
    errors = [line for line in fuzzed.log_tail(10**9).splitlines() if '"level": "error"' in line]
    assert errors == [], errors[:3]
