"""Prometheus rules and configs, Alertmanager routing: checked by Prometheus's own tools."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from cluster.monitoring import render_prometheus_config
from cluster.observability import (
    ROLLED_BACK_ALERT,
    RULES_DIR,
    alert_durations,
    alert_expressions,
    alertmanager_config,
    compose_files,
    dump,
    local_targets,
    nginx_exporter_enabled,
    prometheus_config,
    prometheus_duration,
    render_rules,
    rolled_back_expression,
    write_rules,
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


DATA_DRIFT = {
    "evaluation_interval": "15s",
    "tests": [
        {
            # Version 3 drifts on exactly the threshold's share of its features (the edge fires);
            # version 2 on less, which never fires however long it lasts.
            "interval": "1m",
            "input_series": [
                {"series": 'model_drift_share{model="adult",model_version="3",job="dispatcher"}', "values": "0 0.5x20"},
                {"series": 'model_drift_share{model="adult",model_version="2",job="dispatcher"}', "values": "0.25x20"},
                {"series": 'model_drift_share_threshold{job="dispatcher"}', "values": "0.5x20"},
            ],
            "alert_rule_test": [
                # Not yet for the whole `for:` (the shipped 10 minutes).
                {"eval_time": "9m", "alertname": "ModelDataDrift", "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": "ModelDataDrift",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning", "action": "retrain", "model": "adult", "model_version": "3",
                            },
                            "exp_annotations": {
                                "summary": "Drift share 0.50 >= 0.5 on adult v3",
                                "description": "50% of the input features of adult version 3 drifted from its "
                                "training data over the monitoring window; a retraining job is requested. "
                                "Per-feature scores: GET /v1/models/adult/monitoring, or the Model drift row "
                                "of the Grafana dashboard.",
                            },
                        }
                    ],
                },
            ],
        }
    ],
}  # fmt: skip


ESTIMATED_ACCURACY = {
    "evaluation_interval": "15s",
    "tests": [
        {
            # Against a reference of 0.875 and an allowed drop of 0.0625 (exact in binary, so the
            # edge is the edge): version 4's estimate falls by 0.125 and fires; version 3's by
            # exactly the allowed drop, which does not; version 5 has no estimate (regression).
            "interval": "1m",
            "input_series": [
                {"series": 'model_reference_accuracy{model="adult",model_version="4"}', "values": "0.875x20"},
                {"series": 'model_estimated_accuracy{model="adult",model_version="4"}', "values": "0.87 0.75x20"},
                {"series": 'model_reference_accuracy{model="adult",model_version="3"}', "values": "0.875x20"},
                {"series": 'model_estimated_accuracy{model="adult",model_version="3"}', "values": "0.8125x20"},
                {"series": 'model_reference_accuracy{model="adult",model_version="5"}', "values": "0.875x20"},
                {"series": "model_estimated_accuracy_max_drop", "values": "0.0625x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "ModelEstimatedAccuracyLow", "exp_alerts": []},
                {
                    "eval_time": "12m",
                    "alertname": "ModelEstimatedAccuracyLow",
                    "exp_alerts": [
                        {
                            "exp_labels": {
                                "severity": "warning", "action": "retrain", "model": "adult", "model_version": "4",
                            },
                            "exp_annotations": {
                                "summary": "Estimated accuracy 0.750 of adult v4 is 0.125 below its reference "
                                "0.875 (allowed drop 0.0625)",
                                "description": "The accuracy of adult version 4, estimated from the confidence of "
                                "its recent predictions, is 0.125 below the validation accuracy of its training, "
                                "more than allowed; a retraining job is requested.",
                            },
                        }
                    ],
                },
            ],
        }
    ],
}  # fmt: skip


def _rolled_back(seconds_ago: str) -> dict[str, Any]:
    """ModelRolledBack as promtool expects it for adult's rollback from version 5 to 4."""
    return {
        "exp_labels": {"severity": "warning", "model": "adult", "model_version": "5", "restored_version": "4"},
        "exp_annotations": {
            "summary": "adult rolled back from version 5 to version 4",
            "description": f"The champion alias of adult went back from version 5 to version 4 {seconds_ago} ago: "
            "on probation, version 5 did worse on live traffic than version 4 by more than allowed. The decision "
            "and its figures: GET /v1/models/adult (rollout.probation), the tags of both versions, or the Rollout "
            "row of the Grafana dashboard. Nothing is retrained.",
        },
    }


def rolled_back_tests(window_m: int) -> dict[str, Any]:
    """Adult is rolled back at 2m; two dispatchers export the gauge (the second from 3m on). One
    alert from the first evaluation on, for `window_m` minutes (the PROBATION_ALERT_S in the rules)."""
    series = 'model_last_rollback_timestamp_seconds{model="adult",model_version="5",restored_version="4",'
    return {
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": series + 'job="dispatcher",instance="d1"}', "values": "_ _ 120x80"},
                    {"series": series + 'job="dispatcher",instance="d2"}', "values": "_ _ _ 120x80"},
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": ROLLED_BACK_ALERT, "exp_alerts": []},
                    {"eval_time": "3m", "alertname": ROLLED_BACK_ALERT, "exp_alerts": [_rolled_back("1m 0s")]},
                    {
                        "eval_time": f"{window_m + 1}m",
                        "alertname": ROLLED_BACK_ALERT,
                        "exp_alerts": [_rolled_back(f"{window_m - 1}m 0s")],
                    },
                    {"eval_time": f"{window_m + 3}m", "alertname": ROLLED_BACK_ALERT, "exp_alerts": []},
                ],
            }
        ],
    }


def _promtool_test(tmp_path: Path, tests: dict[str, Any], rules_dir: Path = RULES_DIR) -> None:
    test_file = tmp_path / "rules.test.yml"
    test_file.write_text(yaml.safe_dump({**tests, "rule_files": [str(p) for p in rules_dir.glob("*.yml")]}))
    result = _run(_tool("promtool"), "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "tests",
    [RULE_TESTS, KEEP_FIRING, SWAP_REFUSED, DATA_DRIFT, ESTIMATED_ACCURACY, rolled_back_tests(60)],
    ids=["fire", "keep-firing-through-a-gap", "swap-refused", "data-drift", "estimated-accuracy", "rolled-back"],
)
def test_alerts_fire_when_they_should(tmp_path: Path, tests: dict[str, Any]):
    _promtool_test(tmp_path, tests)


def test_the_rollback_alert_only_warns():
    """ModelRolledBack names the versions and never asks for a retraining: the previous champion
    serves again, and a retraining from the same data would not explain the drop."""
    rule = _rule(RULES_DIR, ROLLED_BACK_ALERT)
    assert rule["labels"] == {"severity": "warning"} and rule["for"] == "0m"
    assert rule["expr"] == rolled_back_expression(Settings(_env_file=None).probation.alert_s)
    assert "model_last_rollback_timestamp_seconds" in rule["expr"]
    for label in ("model", "model_version", "restored_version"):
        assert f"$labels.{label}" in rule["annotations"]["summary"], label
    assert rolled_back_expression(90.5).endswith("< 90.5\n")


def test_every_alert_that_retrains_outlasts_a_dispatcher_restart():
    """A restart blanks the dispatcher's series for a few scrapes: without keep_firing_for, the
    episode would end there and the webhook queue a second job for the same problem."""
    acting = [
        rule
        for path in RULES_DIR.glob("*.yml")
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if rule.get("labels", {}).get("action") == "retrain"
    ]
    assert {r["alert"] for r in acting} >= {"ModelAccuracyLow", "ModelDataDrift", "ModelEstimatedAccuracyLow"}
    for rule in acting:
        assert rule.get("keep_firing_for"), rule["alert"]


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
        ("alertname=ModelDataDrift action=retrain severity=warning model=adult model_version=3", "retrain"),
        ("alertname=ModelEstimatedAccuracyLow action=retrain severity=warning model=adult", "retrain"),
        ("alertname=ComponentDown severity=critical", "platform"),
        ("alertname=TrainingQueueStalled severity=warning", "platform"),
        ("alertname=ModelRolledBack severity=warning model=adult model_version=5 restored_version=4", "platform"),
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


@pytest.mark.parametrize(
    ("seconds", "written"), [(600, "10m"), (3600, "1h"), (90, "90s"), (0, "0s"), (0.5, "500ms"), (5400, "90m")]
)
def test_durations_are_written_as_prometheus_reads_them(seconds: float, written: str):
    assert prometheus_duration(seconds) == written


def _rule(rules_dir: Path, alert: str) -> dict[str, Any]:
    for path in rules_dir.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if rule["alert"] == alert:
                    return dict(rule)
    raise AssertionError(f"no rule {alert} in {rules_dir}")


def test_the_shipped_rules_hold_the_settings_defaults():
    """Compose reads the shipped file as it is: its `for:` must be what the settings default to."""
    for alert, seconds in alert_durations(Settings(_env_file=None)).items():
        assert _rule(RULES_DIR, alert)["for"] == prometheus_duration(seconds), alert


def test_cluster_up_renders_the_settings_durations_into_its_own_rules(tmp_path: Path):
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        monitor={"drift_alert_for_s": 90, "estimated_accuracy_alert_for_s": 1800},
        probation={"alert_s": 600},
    )
    config = yaml.safe_load(render_prometheus_config(settings).read_text())
    rendered = tmp_path / "observability" / "rules"
    assert config["rule_files"] == [f"{rendered}/*.yml"]
    assert _rule(rendered, "ModelDataDrift")["for"] == "90s"
    assert _rule(rendered, "ModelEstimatedAccuracyLow")["for"] == "30m"
    assert _rule(rendered, ROLLED_BACK_ALERT)["expr"] == rolled_back_expression(600)
    # The rollback alert fires for the settings' 10 minutes, not the shipped hour.
    _promtool_test(tmp_path, rolled_back_tests(10), rendered)
    # Everything else as shipped, and Prometheus's own checker takes it.
    assert _rule(rendered, "ModelAccuracyLow") == _rule(RULES_DIR, "ModelAccuracyLow")
    assert sorted(p.name for p in rendered.glob("*.yml")) == sorted(p.name for p in RULES_DIR.glob("*.yml"))
    result = _run(_tool("promtool"), "check", "rules", *map(str, rendered.glob("*.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    # A later `cluster up` with other settings rewrites them.
    settings.monitor.drift_alert_for_s = 300
    render_prometheus_config(settings)
    assert _rule(rendered, "ModelDataDrift")["for"] == "5m"


def test_a_rules_dir_of_one_s_own_is_used_as_it_is(tmp_path: Path):
    own = tmp_path / "my-rules"
    own.mkdir()
    (own / "mine.yml").write_text("groups: []\n")
    settings = Settings(
        _env_file=None, state_dir=tmp_path / "state", prometheus={"rules_dir": own}, monitor={"drift_alert_for_s": 90}
    )
    config = yaml.safe_load(render_prometheus_config(settings).read_text())
    assert config["rule_files"] == [f"{own}/*.yml"]
    assert (own / "mine.yml").read_text() == "groups: []\n"
    assert not (tmp_path / "state" / "observability" / "rules").exists()


def test_rendering_refuses_a_duration_for_an_alert_no_rule_has(tmp_path: Path):
    with pytest.raises(ValueError, match="ModelDriftRenamed"):
        render_rules({"ModelDriftRenamed": 60})
    with pytest.raises(ValueError, match="ModelRolledBackRenamed"):
        render_rules({}, expressions={"ModelRolledBackRenamed": "vector(1)"})
    assert set(alert_expressions(Settings(_env_file=None))) == {ROLLED_BACK_ALERT}
    # A rule file the shipped directory no longer has leaves the rendered one.
    stale = tmp_path / "removed.yml"
    stale.write_text("groups: []\n")
    write_rules(tmp_path, {"ModelDataDrift": 60})
    assert not stale.exists() and _rule(tmp_path, "ModelDataDrift")["for"] == "1m"
