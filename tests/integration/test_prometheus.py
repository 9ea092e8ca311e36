"""Prometheus (the Debian binary `cluster up` starts) scraping the running stack."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from cluster.demo import wait_for_version
from serve_apps.schemas import EXAMPLE_ROW


def query(stack, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.settings.prometheus.url}/api/v1/query", params={"query": promql}, timeout=10)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def wait_for(
    stack, promql: str, timeout_s: float = 90, until: Callable[[list[dict[str, Any]]], bool] = bool
) -> list[dict[str, Any]]:
    """Poll until the query's result satisfies `until` (by default: not empty). Series appear one
    report interval of Ray's metrics agent after the event, not all at once."""
    deadline = time.monotonic() + timeout_s
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        result = query(stack, promql)
        if until(result):
            return result
        time.sleep(1)
    raise AssertionError(f"{promql}: no satisfying result within {timeout_s}s; last: {result}")


@pytest.fixture(scope="module")
def served(stack, trained):
    assert wait_for_version(stack.settings, str(trained["model_version"]), 60)
    for _ in range(5):
        response = stack.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW] * 3}, headers=stack.auth)
        assert response.status_code == 200
    assert stack.http.post("/v1/predict", json={"instances": []}, headers=stack.auth).status_code == 422
    return trained


def test_every_component_is_a_healthy_target(stack, served):
    expected = {"prometheus", "alertmanager", "ray", "dispatcher", "mlflow", "rabbitmq", "postgres", "nginx"}
    deadline = time.monotonic() + 60
    health: dict[str, set[str]] = {}
    while time.monotonic() < deadline:
        targets = httpx.get(f"{stack.settings.prometheus.url}/api/v1/targets", timeout=10).json()["data"]
        health = {}
        for target in targets["activeTargets"]:
            health.setdefault(target["labels"]["job"], set()).add(target["health"])
        if set(health) >= expected and all(states == {"up"} for states in health.values()):
            return
        time.sleep(1)
    down = [(t["scrapeUrl"], t["lastError"]) for t in targets["activeTargets"] if t["health"] != "up"]
    raise AssertionError(f"targets not all up: {health}; down: {down}")


def test_queries_return_the_application_metrics(stack, served):
    version = str(served["model_version"])
    codes = lambda result: {r["metric"]["status_code"] for r in result}  # noqa: E731
    requests = wait_for(
        stack,
        'sum by (status_code) (ray_serve_num_http_requests_total{application="inference"})',
        until=lambda result: codes(result) >= {"200", "422"},
    )
    assert codes(requests) >= {"200", "422"}
    latency = wait_for(stack, 'sum(ray_serve_http_request_latency_ms_count{application="inference"}) >= 5')
    assert float(latency[0]["value"][1]) >= 5
    rows = wait_for(stack, "sum(ray_model_request_rows_sum) >= 15")
    assert float(rows[0]["value"][1]) >= 15
    classes = wait_for(
        stack,
        f'sum by (label) (ray_model_predictions_total{{model_version="{version}"}})',
        until=lambda result: sum(float(r["value"][1]) for r in result) >= 15,
    )
    assert {r["metric"]["label"] for r in classes} <= {"<=50K", ">50K"}
    assert sum(float(r["value"][1]) for r in classes) >= 15
    serving = wait_for(stack, f"max(ray_model_serving_version) >= {version}")
    assert float(serving[0]["value"][1]) >= float(version)
    assert wait_for(stack, 'training_jobs{state="succeeded"}')
    assert float(wait_for(stack, "model_live_accuracy_threshold")[0]["value"][1]) == stack.settings.accuracy.threshold
    assert wait_for(stack, "pg_up")[0]["value"][1] == "1"
    assert wait_for(stack, "rabbitmq_queue_messages_ready")
    # Nginx in front: its connection counters grow with the predictions that went through it.
    assert float(wait_for(stack, "nginx_http_requests_total >= 6")[0]["value"][1]) >= 6
