"""Shared fixtures: one real stack (Ray head, MLflow on this machine's PostgreSQL, the Serve app)
for the integration and end-to-end tests, a hermetic one (cluster/sandbox.py) started and stopped
through `python -m cluster`."""

from __future__ import annotations

import json
import os
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.observability import RULES_DIR
from cluster.sandbox import (
    OtlpSink,
    Stack,
    database_url,
    delete_queues,
    drop_database,
    stack_environment,
    start,
    stop,
    temporary_database,
    training_queues,
)
from core.settings import REPO_ROOT, get_settings

ALERT_WEBHOOK_TOKEN = secrets.token_urlsafe(24)
RAY_AUTH_TOKEN = secrets.token_urlsafe(24)
MLFLOW_PASSWORD = secrets.token_urlsafe(16)
UI_PASSWORD = secrets.token_urlsafe(16)


def pytest_configure(config: pytest.Config) -> None:
    """Token authentication on for every Ray cluster of the session. Ray reads RAY_AUTH_MODE once,
    when this process first imports it (collection does), so it is set before anything else."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = RAY_AUTH_TOKEN


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-duration",
        type=float,
        default=30.0,
        help="seconds of steady load in the soak test (`make test-reliability` gives it 600)",
    )
    parser.addoption(
        "--reliability-report",
        default=None,
        help="write the figures the fault, soak and fuzz tests measured to this JSON file",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e", "reliability", "security"):
            if f"/tests/{kind}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """MLflow's backend store for the test stack."""
    with temporary_database("mlflow_test") as name:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def jobs_database() -> Iterator[str]:
    """A database name for training-job records; `cluster up` creates it, as it would for a user."""
    name = f"jobs_test_{uuid.uuid4().hex[:8]}"
    yield database_url(name)
    drop_database(name)


@pytest.fixture(scope="session")
def queue_names() -> Iterator[dict[str, str]]:
    """Per-session exchange and queues on this machine's RabbitMQ, deleted afterwards."""
    names = training_queues(f"training-test-{uuid.uuid4().hex[:8]}")
    yield names
    delete_queues(names)


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What the reliability and security tests measured, by name; written out at the end of the
    session with `--reliability-report PATH` (docs/RELIABILITY.md quotes that file)."""
    collected: dict[str, Any] = {}
    yield collected
    target = request.config.getoption("--reliability-report")
    if target and collected:
        Path(target).write_text(json.dumps(collected, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def otlp_sink() -> Iterator[OtlpSink]:
    """Receives the stack's spans over OTLP/HTTP, as the collector would."""
    sink = OtlpSink().start()
    yield sink
    sink.stop()


def fast_alert_rules(target: Path, for_s: int = 3) -> Path:
    """The shipped rules with short `for:` durations, so a test sees an alert fire in seconds; the
    label-free alerts left out (`LABEL_FREE_ALERTS`: a test loads them for its own model)."""
    target.mkdir(parents=True, exist_ok=True)
    for source in RULES_DIR.glob("*.yml"):
        rules = yaml.safe_load(source.read_text())
        for group in rules["groups"]:
            group["rules"] = [rule for rule in group["rules"] if rule.get("alert") not in LABEL_FREE_ALERTS]
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{for_s}s"
        (target / source.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    return target


# Rules that judge traffic without labels: the session's tests send the same example row again and
# again, which is drift by design, so the shared stack loads them only for the models of the test
# that asks (`label_free_rules`).
LABEL_FREE_ALERTS = ("ModelDataDrift", "ModelEstimatedAccuracyLow")


def label_free_rules(model: str, alerts: list[str], for_s: int = 3) -> dict[str, Any]:
    """A rule file with the shipped `alerts`, restricted to `model`, with short `for:` durations."""
    found = []
    for source in RULES_DIR.glob("*.yml"):
        for group in yaml.safe_load(source.read_text())["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") in alerts:
                    mine = f'max by (model) ({{__name__=~"model_.+", model="{model}"}})'
                    found.append({**rule, "expr": f"({rule['expr']}) and on(model) {mine}", "for": f"{for_s}s"})
    assert sorted(r["alert"] for r in found) == sorted(alerts), f"not in the shipped rules: {alerts}"
    return {"groups": [{"name": f"label-free-{model}", "rules": found}]}


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: str,
    jobs_database: str,
    queue_names: dict[str, str],
    otlp_sink: OtlpSink,
) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack")
    api_key = secrets.token_urlsafe(24)
    overrides = {
        **stack_environment(
            state,
            api_keys=[api_key, f"second-{api_key}"],
            database_url=jobs_database,
            queues=queue_names,
            experiment="tests",
            ray_auth_token=RAY_AUTH_TOKEN,
            mlflow_password=MLFLOW_PASSWORD,
            ui_password=UI_PASSWORD,
        ),
        "MLFLOW_BACKEND_STORE_URI": pg_database,
        "API_KEY_REFRESH_S": "1",
        "MAX_BATCH_ROWS": "50",
        "DISPATCHER_MAX_ATTEMPTS": "2",
        "DISPATCHER_BACKOFF_BASE_S": "1",
        "DISPATCHER_POLL_INTERVAL_S": "1",
        # The session's admin key starts the jobs of many tests within the hour, and the fault
        # tests keep three in flight at once; the limits themselves are tested with keys of
        # their own against whatever these are (tests/integration/test_training_job_limits.py).
        "TRAINING_MAX_ACTIVE_PER_KEY": "3",
        "TRAINING_MAX_PER_HOUR_PER_KEY": "200",
        # Observability: spans to the test's receiver, Prometheus and Alertmanager with second-scale
        # intervals, and the closed loop's knobs turned down to test size. Not a 1 s scrape: each
        # scrape of Ray's metrics agent costs it a large share of a core, taken from the tests.
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink.endpoint,
        "PROMETHEUS_SCRAPE_INTERVAL_S": "3",
        "PROMETHEUS_RULES_DIR": str(fast_alert_rules(state / "rules")),
        "ALERTMANAGER_GROUP_WAIT_S": "1",
        "ALERT_WEBHOOK_TOKEN": ALERT_WEBHOOK_TOKEN,
        "ACCURACY_REFRESH_S": "1",
        "ACCURACY_MIN_FEEDBACK": "20",
        "ACCURACY_THRESHOLD": "0.6",
        "RETRAIN_OVERRIDES": '{"train.epochs": 3, "train.patience": 2}',
        # The drift monitor judges small windows often (the label-free alerts: LABEL_FREE_ALERTS).
        "MONITOR_REFRESH_S": "2",
        "MONITOR_MIN_ROWS": "100",
        "MONITOR_MAX_ROWS": "300",
        # Rollouts judged on test-sized windows; callers told apart by a header the tests set. The
        # label-free estimate stays out of probation here: the session's tests promote versions
        # of one model again and again on repeated example rows, whose estimates say nothing.
        "ROLLOUT_REFRESH_S": "1",
        "ROLLOUT_WINDOW_REQUESTS": "200",
        "ROLLOUT_MIN_ROWS": "80",
        "ROLLOUT_MIN_LABELS": "40",
        "ROLLOUT_MIN_AGREEMENT": "0.85",
        "ROLLOUT_CANARY_KEY": "header:X-Client-Id",
        "PROBATION_WINDOW_S": "300",
        "PROBATION_MIN_LABELS": "40",
        "PROBATION_USE_ESTIMATE": "false",
    }
    # This process reaches the stack with the same settings as its own processes (get_settings,
    # the CLIs it runs), so they go into its environment for the session.
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    get_settings.cache_clear()
    env = dict(os.environ)
    try:
        start(env)
        running = Stack(settings=get_settings(), env=env, api_key=api_key)
        yield running
        running.close()
    finally:
        stop(env)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def train_job(stack: Stack, config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """Submit a training job through the Ray Jobs API, wait for it, return its result line.

    A dict config is written next to the state dir first, as a user would write a new YAML file.
    """
    from jobs.result import training_result
    from services.ray_submission import follow_job, submit_training

    if isinstance(config, dict):
        path = stack.settings.state_dir / f"{config['name']}.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    job_id = submit_training(stack.settings, str(config), overrides)
    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    result["job_id"] = job_id
    return result


@pytest.fixture(scope="session")
def trained(stack: Stack) -> dict[str, Any]:
    """The first model: a short training job through the Jobs API, promoted to champion."""
    return train_job(stack, "jobs/configs/adult.yaml", ["train.epochs=2", "train.patience=2"])


@pytest.fixture
def adult_paths() -> tuple[Path, Path]:
    return REPO_ROOT / "data/adult/adult.data.gz", REPO_ROOT / "data/adult/adult.test.gz"
