"""The Grafana dashboard and the alert rules query only what the mirror exports, and are valid.

- Every PromQL expression in ``grafana/dashboards/registry-proxy.json`` and
  ``deploy/prometheus/alerts.yml`` names only metrics found in the mirror's ``/metrics`` after
  traffic that exercises hits, misses and upstream errors (``up`` is Prometheus' own).
- Every panel and every query picks its data source through the ``${datasource}`` variable.
- The provisioning files point Grafana at the dashboards directory that compose mounts.
- ``promtool check rules`` accepts the alert rules and, turned into recording rules, every
  dashboard query; ``promtool test rules`` passes ``deploy/prometheus/alerts_test.yml``.

``promtool`` is Debian's ``prometheus`` package (``scripts/install-system-deps``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from fakeupstream import ACCEPT_ALL_MANIFESTS, FakeUpstreamServer
from harness.mirror import StartMirror
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "dashboards" / "registry-proxy.json"
PROVISIONING = ROOT / "grafana" / "provisioning"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
DATASOURCE = "${datasource}"
# Series Prometheus records itself for every scrape target.
SCRAPE_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
# What Grafana substitutes before a query reaches Prometheus.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}

# PromQL words that look like identifiers but are not metric names.
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"bool", "inf", "nan"}
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_OFFSET = re.compile(r"\boffset\s+-?[0-9a-z]+")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|[A-Za-z_:][A-Za-z0-9_:]*(?P<call>\s*\()?")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and keywords removed)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _OFFSET.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _TOKEN.finditer(text):
        token = match.group(0)
        if token[0].isdigit() or match.group("call") or token.lower() in _KEYWORDS:
            continue
        names.add(token)
    return names


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def panels() -> list[dict[str, Any]]:
    return [panel for panel in dashboard()["panels"] if panel["type"] != "row"]


def dashboard_queries() -> list[str]:
    return [target["expr"] for panel in panels() for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def for_prometheus(expr: str) -> str:
    """A dashboard query as Grafana sends it: its interval variables substituted."""
    for variable, replacement in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, replacement)
    return expr


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing: Debian package prometheus (scripts/install-system-deps)",
            pytrace=False,
        )
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
async def exported_names(mirror: StartMirror, fake_upstream: FakeUpstreamServer) -> set[str]:
    """Every series name in the mirror's /metrics after a hit, a miss and an upstream error."""
    image = fake_upstream.registry.add_image("team/app", "1.0", [b"layer"])
    client = await mirror()
    accept = {"Accept": ACCEPT_ALL_MANIFESTS}
    for _ in range(2):
        await (await client.get("/v2/team/app/manifests/1.0", headers=accept)).read()
        await (await client.get(f"/v2/team/app/blobs/{image.layer_digests[0]}")).read()
    fake_upstream.registry.fail_next("/manifests/", 500)
    await (await client.get("/v2/team/app/manifests/2.0", headers=accept)).read()
    await (await client.get("/readyz")).read()
    text = await (await client.get("/metrics")).text()
    return set(series_names(text))


def series_names(exposition: str) -> Iterator[str]:
    """Sample names, plus those a declared family yields even before its first observation."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in text_string_to_metric_families(exposition):
        for suffix in suffixes.get(family.type, ("",)):
            yield family.name + suffix
        for sample in family.samples:
            yield sample.name


# --------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------


def test_metric_names_are_read_out_of_promql_without_functions_labels_or_keywords() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(a_bucket{route="x",le!~"1e3"}[5m])))'
        " / on(instance) group_left(upstream) b_total offset 5m > bool 1e3"
        ' and ignoring(kind) max_over_time(c:recorded[1h:1m]) or vector(1) unless d{x="y}"}'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c:recorded", "d"}


def test_the_dashboard_and_the_alerts_query_only_metrics_the_mirror_exports(
    exported_names: set[str],
) -> None:
    assert "registry_proxy_upstream_errors_total" in exported_names
    assert "registry_proxy_http_request_duration_seconds_bucket" in exported_names
    queries = [*dashboard_queries(), *(rule["expr"] for rule in alert_rules())]
    unknown = {
        name: expr
        for expr in queries
        for name in metric_names(expr)
        if name not in exported_names and name not in SCRAPE_SERIES
    }
    assert unknown == {}
    used = set().union(*(metric_names(expr) for expr in queries))
    assert len(used) >= 15


def test_the_dashboard_covers_what_an_operator_asks_about() -> None:
    used = set().union(*(metric_names(expr) for expr in dashboard_queries()))
    prefix = "registry_proxy_"
    wanted = {
        "up",
        *(
            prefix + name
            for name in (
                "http_request_duration_seconds_count",
                "http_request_duration_seconds_bucket",
                "blob_time_to_first_byte_seconds_bucket",
                "upstream_request_duration_seconds_bucket",
                "upstream_errors_total",
                "served_bytes_total",
                "upstream_fetched_bytes_total",
                "cache_requests_total",
                "cache_size_bytes",
                "cache_budget_bytes",
                "cache_evictions_total",
                "downloads_in_flight",
                "event_loop_lag_seconds",
                "digest_mismatches_total",
            )
        ),
    }
    assert wanted - used == set()
    queries = " ".join(dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le, route)" in queries


# --------------------------------------------------------------------------------------------
# Grafana
# --------------------------------------------------------------------------------------------


def test_every_panel_and_query_uses_the_datasource_variable() -> None:
    variables = dashboard()["templating"]["list"]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert len(datasource) == 1
    assert datasource[0]["type"] == "datasource"
    assert datasource[0]["query"] == "prometheus"
    assert len(panels()) >= 15
    for panel in panels():
        assert panel["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    everything = dashboard()["panels"]
    ids = [panel["id"] for panel in everything]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in everything:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, panel["title"]
        cells |= area


def test_grafana_provisioning_loads_the_dashboard_from_where_compose_mounts_it() -> None:
    sources = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["isDefault"] is True
    compose = yaml.safe_load(COMPOSE.read_text())
    assert "prometheus" in compose["services"]
    assert source["url"] == "http://prometheus:9090"

    providers = yaml.safe_load((PROVISIONING / "dashboards" / "registry-proxy.yml").read_text())
    (provider,) = providers["providers"]
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"../grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


# --------------------------------------------------------------------------------------------
# Alerts
# --------------------------------------------------------------------------------------------


def test_every_alert_waits_has_a_severity_and_says_what_to_check() -> None:
    rules = alert_rules()
    assert {rule["alert"] for rule in rules} >= {
        "RegistryProxyDown",
        "RegistryProxyUpstreamErrors",
        "RegistryProxyServingStale",
        "RegistryProxyCacheChurn",
        "RegistryProxyManifestLatencyHigh",
        "RegistryProxyDigestMismatch",
        "RegistryProxyNotReady",
        "RegistryProxyEventLoopLag",
    }
    for rule in rules:
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert len(rule["annotations"]["description"]) > 80, rule["alert"]


def test_promtool_accepts_the_alert_rules() -> None:
    result = run(promtool(), "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = run(promtool(), "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    names = {case["alertname"] for test in tested for case in test["alert_rule_test"]}
    assert len(names) >= 2


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    rules = [
        {"record": f"dashboard:query_{number}", "expr": for_prometheus(expr)}
        for number, expr in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool(), "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
