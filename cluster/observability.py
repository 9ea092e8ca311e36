"""Prometheus and Alertmanager configuration, built from one description of the scrape targets.

The local stack (`cluster up`) renders it with loopback addresses from the settings; compose gets
the same jobs with its service names, written to cluster/prometheus/prometheus.yml and
cluster/alertmanager/alertmanager.yml by `python -m cluster render-observability` (a test keeps
the committed files equal to what this module produces).

The alert rules are cluster/prometheus/rules. The `for:` of the drift and estimated-accuracy alerts
is a setting (MONITOR_DRIFT_ALERT_FOR_S, MONITOR_ESTIMATED_ACCURACY_ALERT_FOR_S), and so is how
long ModelRolledBack fires after a rollback (PROBATION_ALERT_S, a number in its expression):
`cluster up` renders a copy of the rules with those into its state directory (`render_rules`) and
points Prometheus at it, unless PROMETHEUS_RULES_DIR names another directory, whose rules are used
as they are. Compose mounts the shipped rules as they are, so it keeps the defaults written there;
a compose deployment changes them by editing the rule file.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cluster.edge import nginx_binary
from core.settings import REPO_ROOT, Settings

RULES_DIR = REPO_ROOT / "cluster" / "prometheus" / "rules"
COMPOSE_PROMETHEUS = REPO_ROOT / "cluster" / "prometheus" / "prometheus.yml"
COMPOSE_ALERTMANAGER = REPO_ROOT / "cluster" / "alertmanager" / "alertmanager.yml"
WEBHOOK_PATH = "/v1/alerts/alertmanager"
RAY_SERVICE_DISCOVERY_FILE = "prom_metrics_service_discovery.json"


@dataclass(frozen=True)
class Targets:
    """Where each component answers; None leaves its scrape job out."""

    prometheus: str
    alertmanager: str
    ray_service_discovery: str  # the file Ray's head writes and refreshes as nodes come and go
    dispatcher: str | None
    mlflow: str | None
    rabbitmq: str | None
    postgres_exporter: str | None
    rules_dir: str
    scrape_interval_s: float = 15.0
    nginx_exporter: str | None = None
    extra_jobs: list[dict[str, Any]] = field(default_factory=list)


def local_targets(settings: Settings, ray_temp_dir: Path, rules_dir: Path) -> Targets:
    host = settings.prometheus.host
    return Targets(
        prometheus=f"{host}:{settings.prometheus.port}",
        alertmanager=f"{host}:{settings.alertmanager.port}",
        ray_service_discovery=str(ray_temp_dir / RAY_SERVICE_DISCOVERY_FILE),
        dispatcher=f"{settings.dispatcher.host}:{settings.dispatcher.metrics_port}"
        if settings.training_jobs_enabled
        else None,
        mlflow=f"{settings.mlflow.host}:{settings.mlflow.port}",
        rabbitmq=f"127.0.0.1:{settings.rabbitmq.metrics_port}" if settings.amqp.url else None,
        postgres_exporter=f"127.0.0.1:{settings.postgres.exporter_port}" if settings.database.url else None,
        rules_dir=str(rules_dir),
        scrape_interval_s=settings.prometheus.scrape_interval_s,
        nginx_exporter=f"127.0.0.1:{settings.nginx.exporter_port}" if nginx_exporter_enabled(settings) else None,
    )


def nginx_exporter_enabled(settings: Settings) -> bool:
    """The local stack runs the exporter when it runs Nginx and the exporter is installed."""
    return nginx_binary(settings) is not None and shutil.which("prometheus-nginx-exporter") is not None


def compose_targets() -> Targets:
    return Targets(
        prometheus="prometheus:9090",
        alertmanager="alertmanager:9093",
        ray_service_discovery=f"/tmp/ray/{RAY_SERVICE_DISCOVERY_FILE}",
        dispatcher="dispatcher:9102",
        mlflow="mlflow:5000",
        rabbitmq="rabbitmq:15692",
        postgres_exporter="postgres-exporter:9187",
        nginx_exporter="nginx-exporter:9113",
        rules_dir="/etc/prometheus/rules",
        extra_jobs=[
            {"job_name": "otel-collector", "static_configs": [{"targets": ["otel-collector:8888"]}]},
            {"job_name": "tempo", "static_configs": [{"targets": ["tempo:3200"]}]},
            {"job_name": "loki", "static_configs": [{"targets": ["loki:3100"]}]},
        ],
    )


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def prometheus_duration(seconds: float) -> str:
    """Seconds as Prometheus writes a duration, in the largest unit that is exact: 600 -> 10m."""
    milliseconds = round(seconds * 1000)
    if milliseconds == 0:
        return "0s"
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if milliseconds % size == 0:
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


def alert_durations(settings: Settings) -> dict[str, float]:
    """The alerts whose `for:` is a setting, in seconds."""
    return {
        "ModelDataDrift": settings.monitor.drift_alert_for_s,
        "ModelEstimatedAccuracyLow": settings.monitor.estimated_accuracy_alert_for_s,
    }


ROLLED_BACK_ALERT = "ModelRolledBack"


def _promql_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def rolled_back_expression(window_s: float) -> str:
    """ModelRolledBack's expression: true for `window_s` after a model's latest rollback, with the
    versions as labels. The window is in the expression rather than a `for:`, which would only
    delay the start. The gauge is read from the database, so whichever dispatchers export it
    (several, or a new leader after a failover) agree, and their series make one alert."""
    return (
        "time() - max by (model, model_version, restored_version) (model_last_rollback_timestamp_seconds)\n"
        f"  < {_promql_number(window_s)}\n"
    )


def alert_expressions(settings: Settings) -> dict[str, str]:
    """The alerts whose expression holds a setting."""
    return {ROLLED_BACK_ALERT: rolled_back_expression(settings.probation.alert_s)}


class _RulesDumper(yaml.SafeDumper):
    """Multi-line text (the rules' PromQL) as a block, as the shipped file writes it."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_RulesDumper.add_representer(str, _text)


RENDERED_RULES_HEADER = (
    "# Rendered by `cluster up` from cluster/prometheus/rules with the `for:` durations and the\n"
    "# rollback alert's window of the settings (MONITOR_*_ALERT_FOR_S, PROBATION_ALERT_S); do not\n"
    "# edit, it is rewritten on every `cluster up`.\n"
)


def render_rules(
    durations: Mapping[str, float], source: Path = RULES_DIR, expressions: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every rule file of `source` (file name -> text), with the `for:` of the alerts named in
    `durations` set to theirs, and the `expr` of those named in `expressions`. An alert named
    there but in no file is an error: a renamed rule would otherwise lose its setting without a
    word."""
    expressions = expressions or {}
    rendered: dict[str, str] = {}
    missing = set(durations) | set(expressions)
    for path in sorted(source.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for group in document.get("groups", []):
            for rule in group.get("rules", []):
                name = rule.get("alert")
                if name in durations:
                    rule["for"] = prometheus_duration(durations[name])
                    missing.discard(name)
                if name in expressions:
                    rule["expr"] = expressions[name]
                    missing.discard(name)
        rendered[path.name] = RENDERED_RULES_HEADER + yaml.dump(
            document, Dumper=_RulesDumper, sort_keys=False, allow_unicode=True, width=1000
        )
    if missing:
        raise ValueError(f"no alert rule in {source} is named {', '.join(sorted(missing))}")
    return rendered


def write_rules(
    target: Path, durations: Mapping[str, float], source: Path = RULES_DIR, expressions: Mapping[str, str] | None = None
) -> Path:
    """Render the rules into `target`, a directory of their own: files no longer shipped go."""
    rendered = render_rules(durations, source, expressions)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.yml"):
        if stale.name not in rendered:
            stale.unlink()
    for name, text in rendered.items():
        # Written aside and renamed: a reload never reads half a file.
        partial = target / f".{name}.tmp"
        partial.write_text(text, encoding="utf-8")
        partial.replace(target / name)
    return target


def _static(job: str, target: str) -> dict[str, Any]:
    return {"job_name": job, "static_configs": [{"targets": [target]}]}


def prometheus_config(targets: Targets) -> dict[str, Any]:
    jobs: list[dict[str, Any]] = [
        _static("prometheus", targets.prometheus),
        _static("alertmanager", targets.alertmanager),
        # Ray's head lists every node's metrics agent (Serve's and our replicas' metrics included)
        # in this file; Prometheus re-reads it, so new worker nodes are scraped without a reload.
        # That file is a symlink into the current session's directory, where Ray rewrites it: a file
        # watch on this path never fires, so Prometheus re-reads it every scrape interval instead.
        {
            "job_name": "ray",
            "file_sd_configs": [
                {"files": [targets.ray_service_discovery], "refresh_interval": _duration(targets.scrape_interval_s)}
            ],
        },
    ]
    if targets.dispatcher:
        jobs.append(_static("dispatcher", targets.dispatcher))
    if targets.mlflow:
        jobs.append(_static("mlflow", targets.mlflow))
    if targets.rabbitmq:
        jobs.append(_static("rabbitmq", targets.rabbitmq))
    if targets.postgres_exporter:
        jobs.append(_static("postgres", targets.postgres_exporter))
    if targets.nginx_exporter:
        jobs.append(_static("nginx", targets.nginx_exporter))
    jobs.extend(targets.extra_jobs)
    interval = _duration(targets.scrape_interval_s)
    return {
        "global": {
            "scrape_interval": interval,
            "evaluation_interval": interval,
            "external_labels": {"platform": "ray-cluster"},
        },
        "rule_files": [f"{targets.rules_dir}/*.yml"],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [targets.alertmanager]}]}]},
        "scrape_configs": jobs,
    }


def alertmanager_config(webhook_url: str, credentials_file: str, group_wait_s: float) -> dict[str, Any]:
    """The alerts that act (label action=retrain: live accuracy, data drift, estimated accuracy)
    go to the API's webhook; everything else stays in Alertmanager and Grafana until a team adds
    its own receivers."""
    return {
        "route": {
            "receiver": "platform",
            "group_by": ["alertname", "model", "model_version"],
            "group_wait": _duration(group_wait_s),
            "group_interval": "5m",
            "repeat_interval": "4h",
            "routes": [{"receiver": "retrain", "matchers": ['action="retrain"'], "continue": False}],
        },
        "receivers": [
            {"name": "platform"},
            {
                "name": "retrain",
                "webhook_configs": [
                    {
                        "url": webhook_url,
                        "send_resolved": False,
                        "max_alerts": 0,
                        "http_config": {"authorization": {"type": "Bearer", "credentials_file": credentials_file}},
                    }
                ],
            },
        ],
        # An alert that acts is never silenced by a component-down alert: inhibited, it would not
        # reach the webhook, and the retraining it asks for would not be queued.
        "inhibit_rules": [
            {
                "source_matchers": ['severity="critical"', 'alertname="ComponentDown"'],
                "target_matchers": ['severity="warning"', 'action!="retrain"'],
                "equal": ["job"],
            }
        ],
    }


def dump(config: dict[str, Any], header: str) -> str:
    return header + yaml.safe_dump(config, sort_keys=False)


COMPOSE_HEADER = "# Generated by `python -m cluster render-observability` from cluster/observability.py; do not edit.\n"


def compose_files() -> dict[Path, str]:
    return {
        COMPOSE_PROMETHEUS: dump(prometheus_config(compose_targets()), COMPOSE_HEADER),
        COMPOSE_ALERTMANAGER: dump(
            alertmanager_config(f"http://ray-head:8000{WEBHOOK_PATH}", "/run/secrets/alert_webhook_token", 30.0),
            COMPOSE_HEADER,
        ),
    }


def write_files(files: dict[Path, str]) -> list[Path]:
    """Write generated files (the committed renderings a test compares against)."""
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return list(files)


def write_compose_files() -> list[Path]:
    return write_files(compose_files())
