"""Static checks of the compose-only observability parts: Grafana provisioning and dashboards,
Loki, Tempo and the OpenTelemetry collector. compose.yaml itself: tests/unit/test_compose.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import REPO_ROOT
from tests.observability import dashboard_exprs, dashboard_panels, promql_metric_names, rule_exprs

CONFIG_DIRS = [REPO_ROOT / "cluster" / name for name in ("grafana", "loki", "tempo", "otel-collector")]
COMPOSE_FILE = REPO_ROOT / "compose.yaml"
DATASOURCES_FILE = REPO_ROOT / "cluster/grafana/provisioning/datasources/datasources.yaml"
DASHBOARDS = sorted((REPO_ROOT / "cluster/grafana/dashboards").glob("*.json"))
COLLECTOR_FILE = REPO_ROOT / "cluster/otel-collector/config.yaml"


def yaml_files() -> list[Path]:
    files = [COMPOSE_FILE]
    for directory in CONFIG_DIRS:
        files += sorted([*directory.rglob("*.yml"), *directory.rglob("*.yaml")])
    return files


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE_FILE)


def walk(node: Any) -> list[dict[str, Any]]:
    """Every mapping inside a JSON/YAML document, depth first."""
    found = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found += walk(value)
    elif isinstance(node, list):
        for value in node:
            found += walk(value)
    return found


# --- PromQL helper ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        (
            "histogram_quantile(0.99, sum by (le, route) (rate(ray_serve_http_request_latency_ms_bucket[5m])))",
            {"ray_serve_http_request_latency_ms_bucket"},
        ),
        (
            "max by (model_version) (model_live_accuracy) < on() group_left() max(model_live_accuracy_threshold)",
            {"model_live_accuracy", "model_live_accuracy_threshold"},
        ),
        ('up{job="ray"} == 0', {"up"}),
        (
            'sum(rate(ray_serve_num_http_requests_total{status_code=~"5.."}[5m]))'
            " / clamp_min(sum(rate(ray_serve_num_http_requests_total[5m])), 1e-9)",
            {"ray_serve_num_http_requests_total"},
        ),
        ("sum(increase(training_dead_lettered_messages_total[1h])) > 0", {"training_dead_lettered_messages_total"}),
        ("sum(rate(a_total[5m])) by (job) / ignoring(code) b_total offset 1h", {"a_total", "b_total"}),
        ("x and y unless z or w > bool 1", {"x", "y", "z", "w"}),
        ('{__name__="ray_node_mem_used", ip!=""}', {"ray_node_mem_used"}),
        ('label_replace(up, "dst", "$1", "instance", "(.*):.*")', {"up"}),
        ("max_over_time(training_queue_lag_seconds[1h:5m] @ end())", {"training_queue_lag_seconds"}),
        ("vector(1) + scalar(pg_up) * Inf", {"pg_up"}),
        ("# a comment line\nsum by (state) (training_jobs)", {"training_jobs"}),
    ],
)
def test_promql_metric_names(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


def test_rule_exprs_reads_alerts_and_records(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text(
        yaml.safe_dump(
            {
                "groups": [
                    {
                        "name": "g",
                        "rules": [
                            {"record": "job:up:min", "expr": "min by (job) (up)"},
                            {"alert": "Down", "expr": "job:up:min == 0", "for": "1m"},
                        ],
                    }
                ]
            }
        )
    )
    assert rule_exprs(rules) == [("job:up:min", "min by (job) (up)"), ("Down", "job:up:min == 0")]
    assert rule_exprs(tmp_path) == rule_exprs(rules)


# --- Parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml(path) is not None


def test_dashboards_exist_and_parse() -> None:
    assert DASHBOARDS, "no dashboards under cluster/grafana/dashboards"
    for path in DASHBOARDS:
        assert isinstance(json.loads(path.read_text()), dict), path


# --- Grafana -----------------------------------------------------------------------------------


def provisioned_uids() -> dict[str, str]:
    datasources = load_yaml(DATASOURCES_FILE)["datasources"]
    return {source["uid"]: source["type"] for source in datasources}


def test_datasources_have_fixed_uids() -> None:
    uids = provisioned_uids()
    assert uids == {"prometheus": "prometheus", "loki": "loki", "tempo": "tempo", "alertmanager": "alertmanager"}
    defaults = [s["uid"] for s in load_yaml(DATASOURCES_FILE)["datasources"] if s.get("isDefault")]
    assert defaults == ["prometheus"]


def test_datasource_cross_links_point_at_provisioned_uids() -> None:
    uids = provisioned_uids()
    linked = {node["datasourceUid"] for node in walk(load_yaml(DATASOURCES_FILE)) if "datasourceUid" in node}
    assert linked, "no trace/log/metric links between datasources"
    assert linked <= set(uids), linked - set(uids)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_datasources_are_provisioned(path: Path) -> None:
    uids = provisioned_uids()
    used = [node for node in walk(json.loads(path.read_text())) if isinstance(node.get("datasource"), dict)]
    assert used
    for node in used:
        datasource = node["datasource"]
        assert datasource.get("uid") in uids, f"{path.name}: {datasource} is not provisioned"
        assert datasource.get("type") == uids[datasource["uid"]], f"{path.name}: {datasource} has the wrong type"


def test_dashboard_uids_are_unique() -> None:
    uids = [json.loads(path.read_text()).get("uid") for path in DASHBOARDS]
    assert all(uids), "every dashboard needs a fixed uid"
    assert len(uids) == len(set(uids)), uids


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_panel_has_a_title_and_a_query(path: Path) -> None:
    for panel in dashboard_panels(path):
        assert panel.get("title"), f"{path.name}: panel {panel.get('id')} has no title"
        if panel.get("type") == "row":
            continue
        exprs = [target.get("expr") for target in panel.get("targets", [])]
        assert any(exprs), f"{path.name}: panel {panel['title']!r} has no target with an expr"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panel_ids_are_unique(path: Path) -> None:
    ids = [panel.get("id") for panel in dashboard_panels(path)]
    assert len(ids) == len(set(ids)), ids


def test_overview_dashboard_uses_ray_export_names() -> None:
    path = REPO_ROOT / "cluster/grafana/dashboards/platform-overview.json"
    names = set().union(*(promql_metric_names(expr) for expr in dashboard_exprs(path)))
    # Ray prefixes its metrics with ray_; counters end in _total and histograms in _bucket.
    assert {
        "ray_serve_num_http_requests_total",
        "ray_serve_http_request_latency_ms_bucket",
        "ray_serve_deployment_replica_healthy",
        "ray_serve_actual_batch_size_bucket",
    } <= names
    ray_like = {n for n in names if n.startswith(("serve_", "model_request", "model_serving", "model_predictions"))}
    assert not ray_like, f"missing the ray_ prefix: {ray_like}"


def _row_panels(path: Path, title: str) -> list[dict[str, Any]]:
    """The panels laid out under the row `title`, down to the next row."""
    panels = sorted(dashboard_panels(path), key=lambda p: (p["gridPos"]["y"], p["gridPos"]["x"]))
    start = next(i for i, panel in enumerate(panels) if panel["type"] == "row" and panel["title"] == title)
    below = panels[start + 1 :]
    end = next((i for i, panel in enumerate(below) if panel["type"] == "row"), len(below))
    return below[:end]


def test_the_rollout_row_shows_each_rollout_figure() -> None:
    """Shadow agreement and paired rows, canary share and step, both accuracies on the same rows,
    decisions and rollbacks from the rollout service (on the dispatcher); mirrored and canary
    requests from the replicas (through Ray's agent, so with its prefix)."""
    path = REPO_ROOT / "cluster/grafana/dashboards/platform-overview.json"
    panels = _row_panels(path, "Rollout")
    names = {name for panel in panels for t in panel["targets"] for name in promql_metric_names(t["expr"])}
    assert names == {
        "model_rollout_active", "model_probation_active", "model_rollout_canary_share", "model_rollout_step",
        "model_shadow_agreement", "model_shadow_rows", "model_rollout_accuracy", "model_rollout_decisions_total",
        "model_rollbacks_total", "model_last_rollback_timestamp_seconds", "ray_serve_shadow_requests_total",
        "ray_serve_canary_requests_total",
    }  # fmt: skip
    exprs = " ".join(t["expr"] for panel in panels for t in panel["targets"])
    assert "by (model, outcome) (rate(ray_serve_shadow_requests_total" in exprs
    assert "by (model, model_version, role) (model_rollout_accuracy)" in exprs
    assert all(panel.get("description") for panel in panels)


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_panels_do_not_overlap(path: Path) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in dashboard_panels(path):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for y in range(grid["y"], grid["y"] + grid["h"]):
            for x in range(grid["x"], grid["x"] + grid["w"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_dashboard_providers_read_the_mounted_folders() -> None:
    providers = load_yaml(REPO_ROOT / "cluster/grafana/provisioning/dashboards/dashboards.yaml")["providers"]
    paths = {p["name"]: p["options"]["path"] for p in providers}
    assert paths == {
        "platform": "/var/lib/grafana/dashboards/platform",
        "ray": "/tmp/ray/session_latest/metrics/grafana/dashboards",
    }
    grafana = compose()["services"]["grafana"]
    targets = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert {"/var/lib/grafana/dashboards/platform", "/tmp/ray"} <= targets


# --- OpenTelemetry collector -------------------------------------------------------------------


def test_collector_pipelines_reference_defined_components() -> None:
    config = load_yaml(COLLECTOR_FILE)
    pipelines = config["service"]["pipelines"]
    assert {"traces", "logs"} <= set(pipelines)
    used_exporters: set[str] = set()
    for name, pipeline in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in pipeline.get(kind, []):
                assert component in (config.get(kind) or {}), f"pipeline {name}: {kind[:-1]} {component} undefined"
        assert pipeline["receivers"] and pipeline["exporters"], name
        if "memory_limiter" in pipeline.get("processors", []):
            assert pipeline["processors"][0] == "memory_limiter", f"{name}: memory_limiter must come first"
        used_exporters |= set(pipeline["exporters"])
    assert set(config["exporters"]) == used_exporters, set(config["exporters"]) - used_exporters
    for extension in config["service"].get("extensions", []):
        assert extension in config["extensions"], extension


def test_collector_routes_traces_to_tempo_and_logs_to_loki() -> None:
    config = load_yaml(COLLECTOR_FILE)
    pipelines = config["service"]["pipelines"]
    assert pipelines["traces"]["exporters"] == ["otlp/tempo"]
    assert pipelines["logs"]["exporters"] == ["otlphttp/loki"]
    assert config["exporters"]["otlp/tempo"]["endpoint"] == "tempo:4317"
    assert config["exporters"]["otlphttp/loki"]["endpoint"] == "http://loki:3100/otlp"
    filelog = [name for name in pipelines["logs"]["receivers"] if name.split("/")[0] == "filelog"]
    assert filelog, "the logs pipeline reads no log files"


# --- Loki and Tempo ----------------------------------------------------------------------------


def test_loki_and_tempo_keep_data_in_minio_with_credentials_from_env() -> None:
    loki = load_yaml(REPO_ROOT / "cluster/loki/loki.yaml")
    s3 = loki["common"]["storage"]["s3"]
    assert (s3["endpoint"], s3["bucketnames"]) == ("minio:9000", "loki")
    assert s3["access_key_id"] == "${MINIO_ROOT_USER}" and s3["secret_access_key"] == "${MINIO_ROOT_PASSWORD}"
    assert loki["limits_config"]["allow_structured_metadata"] is True
    tempo = load_yaml(REPO_ROOT / "cluster/tempo/tempo.yaml")["storage"]["trace"]
    assert tempo["backend"] == "s3"
    assert (tempo["s3"]["endpoint"], tempo["s3"]["bucket"]) == ("minio:9000", "tempo")
    assert tempo["s3"]["access_key"] == "${MINIO_ROOT_USER}" and tempo["s3"]["secret_key"] == "${MINIO_ROOT_PASSWORD}"
    # The ${...} above are expanded by the binaries, which only do so when told to.
    services = compose()["services"]
    for name in ("loki", "tempo"):
        assert "-config.expand-env=true" in services[name]["command"], name
    buckets = " ".join(services["minio-init"]["command"])
    assert "loki" in buckets and "tempo" in buckets
