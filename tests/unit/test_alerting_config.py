"""Prometheus rules and configs, Alertmanager routing: checked by Prometheus's own tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from cluster.observability import (
    RULES_DIR,
    alertmanager_config,
    compose_files,
    dump,
    local_targets,
    nginx_exporter_enabled,
    prometheus_config,
)
from core.settings import Settings
from services.feedback.store import VersionAccuracy
from services.monitoring.accuracy import AccuracyGauges


def _tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install prometheus prometheus-alertmanager (the CI script does)"
    return path


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_committed_compose_configs_are_what_the_generator_writes():
    for path, text in compose_files().items():
        assert path.read_text() == text, f"{path} is stale: run `python -m cluster render-observability`"


def test_rules_pass_promtool_and_each_alert_says_what_and_how_bad():
    result = _run(_tool("promtool"), "check", "rules", *map(str, RULES_DIR.glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert "for" in rule and rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def _accuracy_alert(version: str) -> dict[str, Any]:
    """ModelAccuracyLow as promtool expects it for a version at 50 % accuracy."""
    return {
        "exp_labels": {"severity": "warning", "action": "retrain", "model": "adult", "model_version": version},
        "exp_annotations": {
            "summary": f"Live accuracy of adult version {version} below threshold",
            "description": "Live accuracy 50% over the feedback window is below the configured "
            "threshold; a retraining job is requested.",
        },
    }


RULE_TESTS = {
    "evaluation_interval": "15s",
    "tests": [
        {
            # Accuracy of version 3 falls to 0.5 against a 0.6 threshold; version 2 stays fine.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'model_live_accuracy{model="adult",model_version="3",job="dispatcher"}',
                    "values": "0.9 0.5x10",
                },
                {"series": 'model_live_accuracy{model="adult",model_version="2",job="dispatcher"}', "values": "0.9x10"},
                {"series": 'model_live_accuracy_threshold{job="dispatcher"}', "values": "0.6x10"},
                {"series": 'up{job="dispatcher",instance="d:9102"}', "values": "1 1 0 0 0 0"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "ModelAccuracyLow", "exp_alerts": []},
                {
                    "eval_time": "7m",
                    "alertname": "ModelAccuracyLow",
                    "exp_alerts": [_accuracy_alert("3")],
                },
                {
                    "eval_time": "5m",
                    "alertname": "ComponentDown",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "critical", "job": "dispatcher", "instance": "d:9102"},
                            "exp_annotations": {
                                "summary": "dispatcher target d:9102 is down",
                                "description": "Prometheus could not scrape dispatcher at d:9102 for 2 minutes.",
                            },
                        }
                    ],
                },
            ],
        }
    ],
}


KEEP_FIRING = {
    "evaluation_interval": "15s",
    "tests": [
        {
            # Version 5's series vanishes for 3 minutes (the dispatcher restarting): still one episode.
            "interval": "1m",
            "input_series": [
                {
                    "series": 'model_live_accuracy{model="adult",model_version="5"}',
                    "values": "0.5x7 stale stale stale 0.5x3",
                },
                {"series": "model_live_accuracy_threshold", "values": "0.6x14"},
            ],
            "alert_rule_test": [
                {
                    "eval_time": "9m",
                    "alertname": "ModelAccuracyLow",
                    "exp_alerts": [_accuracy_alert("5")],
                }
            ],
        }
    ],
}


SWAP_REFUSED = {
    "evaluation_interval": "15s",
    "tests": [
        {
            # One of two replicas refuses version 9 for 3 minutes, then the alias moves back.
            "interval": "1m",
            "input_series": [
                {"series": 'ray_model_swap_refused_version{model="adult",ReplicaId="a"}', "values": "0 9 9 9 0 0"},
                {"series": 'ray_model_swap_refused_version{model="adult",ReplicaId="b"}', "values": "0x5"},
                {"series": 'ray_model_swap_refused_version{model="shop",ReplicaId="c"}', "values": "0x5"},
            ],
            "alert_rule_test": [
                {"eval_time": "30s", "alertname": "ModelSwapRefused", "exp_alerts": []},
                {
                    "eval_time": "2m",
                    "alertname": "ModelSwapRefused",
                    "exp_alerts": [
                        {
                            "exp_labels": {"severity": "critical", "model": "adult"},
                            "exp_annotations": {
                                "summary": "Replicas refuse to serve adult version 9 named by its champion alias",
                                "description": "The champion alias of adult names version 9, which breaks the "
                                "serving contract of the version being served (task, target, classes or input "
                                "schema) without an operator's approval; the previous version keeps answering. "
                                "Move the alias back, or approve the change with `python -m jobs.promote --model "
                                "adult --version 9 --force --reason TEXT`.",
                            },
                        }
                    ],
                },
                {"eval_time": "5m", "alertname": "ModelSwapRefused", "exp_alerts": []},
            ],
        }
    ],
}


@pytest.mark.parametrize(
    "tests", [RULE_TESTS, KEEP_FIRING, SWAP_REFUSED], ids=["fire", "keep-firing-through-a-gap", "swap-refused"]
)
def test_alerts_fire_when_they_should(tmp_path: Path, tests: dict[str, Any]):
    test_file = tmp_path / "rules.test.yml"
    test_file.write_text(yaml.safe_dump({**tests, "rule_files": [str(p) for p in RULES_DIR.glob("*.yml")]}))
    result = _run(_tool("promtool"), "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        _env_file=None,
        state_dir=tmp_path,
        database={"url": "postgresql://u@db/x"},
        amqp={"url": "amqp://g:g@mq/%2F"},
        alert={"webhook_token": "t"},
    )


def test_local_prometheus_config_passes_promtool_and_scrapes_every_component(tmp_path: Path):
    config = prometheus_config(local_targets(_settings(tmp_path), Path("/tmp/ray"), RULES_DIR))
    path = tmp_path / "prometheus.yml"
    path.write_text(dump(config, ""))
    result = _run(_tool("promtool"), "check", "config", "--syntax-only", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    # Nginx's exporter joins when the stack runs Nginx and the exporter is installed.
    edge = {"nginx"} if nginx_exporter_enabled(_settings(tmp_path)) else set()
    assert jobs == {"prometheus", "alertmanager", "ray", "dispatcher", "mlflow", "rabbitmq", "postgres"} | edge
    settings = _settings(tmp_path)
    no_edge = settings.model_copy(update={"nginx": settings.nginx.model_copy(update={"enabled": False})})
    without = prometheus_config(local_targets(no_edge, Path("/tmp/ray"), RULES_DIR))
    assert "nginx" not in {job["job_name"] for job in without["scrape_configs"]}
    ray = next(job for job in config["scrape_configs"] if job["job_name"] == "ray")
    assert ray["file_sd_configs"][0]["files"] == ["/tmp/ray/prom_metrics_service_discovery.json"]


@pytest.mark.parametrize(
    "labels, receiver",
    [
        ("alertname=ModelAccuracyLow action=retrain", "retrain"),
        ("alertname=ComponentDown severity=critical", "platform"),
    ],
)
def test_alertmanager_sends_only_the_retrain_alert_to_the_webhook(tmp_path: Path, labels: str, receiver: str):
    path = tmp_path / "alertmanager.yml"
    path.write_text(dump(alertmanager_config("http://api/v1/alerts/alertmanager", str(tmp_path / "token"), 1.0), ""))
    (tmp_path / "token").write_text("t")
    amtool = _tool("amtool")
    checked = _run(amtool, "check-config", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    routed = _run(amtool, "config", "routes", "test", f"--config.file={path}", *labels.split())
    assert routed.stdout.strip() == receiver, routed.stdout + routed.stderr


def test_committed_alertmanager_config_passes_amtool(tmp_path: Path):
    # The compose file names the token at /run/secrets; amtool only needs the file to exist.
    text = compose_files()[Path(RULES_DIR.parent.parent / "alertmanager" / "alertmanager.yml")]
    token = tmp_path / "token"
    token.write_text("t")
    path = tmp_path / "alertmanager.yml"
    path.write_text(text.replace("/run/secrets/alert_webhook_token", str(token)))
    result = _run(_tool("amtool"), "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_accuracy_is_published_only_with_enough_feedback_and_old_versions_disappear():
    registry = CollectorRegistry()
    gauges = AccuracyGauges(registry)
    gauges.publish([VersionAccuracy("m", "1", 30, 12), VersionAccuracy("m", "2", 3, 0)], min_feedback=20)
    text = generate_latest(registry).decode()
    assert 'model_live_accuracy{model="m",model_version="1"} 0.4' in text
    assert 'model_live_accuracy{model="m",model_version="2"}' not in text
    assert 'model_live_feedback{model="m",model_version="2"} 3.0' in text
    gauges.publish([VersionAccuracy("m", "2", 25, 25)], min_feedback=20)
    text = generate_latest(registry).decode()
    assert 'model_version="1"' not in text and 'model_live_accuracy{model="m",model_version="2"} 1.0' in text
