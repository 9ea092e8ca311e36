"""Serve replicas SIGKILLed while clients send a steady stream of predictions through Nginx.

With one replica, Serve's HAProxy falls back to Serve's own proxy, which holds requests until the
replacement replica is up; with two, the survivor answers and the edge retries what the killed
one had in flight. The figures each test records (`--reliability-report`) are the ones docs/RELIABILITY.md reports.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import psutil
import pytest

from cluster.apps import deploy_serve
from cluster.sandbox import Stack, replica_pids
from cluster.supervisor import child_environment
from core.health import wait_until
from tests.reliability.load import LoadSummary, SteadyLoad

RATE_PER_S = 100
WARM_UP = 300  # requests before the kill
AFTER = 1700  # requests after it: 20 s in all at 100 req/s, so 0.1 % is 2 requests


def running_replicas(stack: Stack) -> list[int]:
    """Pids of the ingress replicas Serve reports RUNNING (the dashboard's Serve API)."""
    url = f"{stack.settings.ray.dashboard_url}/api/serve/applications/"
    response = httpx.get(url, headers=stack.settings.ray.auth_headers(), timeout=10)
    deployment = response.json()["applications"]["inference"]["deployments"]["Ingress"]
    return [int(r["pid"]) for r in deployment["replicas"] if r["state"] == "RUNNING" and r.get("pid")]


def ready_replicas(stack: Stack, count: int) -> bool:
    """Serve counts `count` running replicas, and their processes are this stack's."""
    running = running_replicas(stack)
    return len(running) == count and set(running) == set(replica_pids(stack.settings))


def scale_to(stack: Stack, low: int, high: int | None = None) -> None:
    """Redeploy with other autoscaling bounds: Serve updates them in place, without restarting
    the running replicas (a lower maximum stops the extra ones at once)."""
    serve = stack.settings.serve.model_copy(
        update={"min_replicas": low, "max_replicas": high or stack.settings.serve.max_replicas}
    )
    settings = stack.settings.model_copy(update={"serve": serve})
    deploy_serve(settings, child_environment(settings))


def kill_one_replica_under_load(stack: Stack, replicas: int, figures: dict[str, Any]) -> LoadSummary:
    before = replica_pids(stack.settings)
    assert len(before) == replicas, before
    victim = before[0]
    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=RATE_PER_S) as load:
        load.wait_for_count(WARM_UP)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: not psutil.pid_exists(victim), 30)
        assert wait_until(lambda: ready_replicas(stack, replicas) and victim not in replica_pids(stack.settings), 120)
        replaced_after_s = time.monotonic() - killed_at
        load.wait_for_count(WARM_UP + AFTER)
    summary = load.summary()
    facts = {"replicas": replicas, "killed_pid": victim, "replaced_after_s": round(replaced_after_s, 2)}
    figures[f"replica_killed_of_{replicas}"] = {**facts, **summary.as_dict()}
    return summary


@pytest.fixture
def two_replicas(stack: Stack, trained: dict[str, Any]) -> Iterator[None]:
    scale_to(stack, 2)
    assert wait_until(lambda: ready_replicas(stack, 2), 180), running_replicas(stack)
    yield
    # Back to one replica now rather than after the downscale delay, then to the shipped bounds:
    # later tests count on the single replica they started with.
    scale_to(stack, 1, 1)
    assert wait_until(lambda: ready_replicas(stack, 1), 120), running_replicas(stack)
    scale_to(stack, 1)


def test_one_killed_replica_is_replaced_and_fails_at_most_one_request_in_a_thousand(stack, trained, figures):
    assert wait_until(lambda: ready_replicas(stack, 1), 60), running_replicas(stack)
    summary = kill_one_replica_under_load(stack, 1, figures)
    assert summary.requests >= WARM_UP + AFTER
    assert summary.failure_rate <= 0.001, summary.as_dict()


def test_with_two_replicas_a_killed_one_fails_no_request(stack, two_replicas, figures):
    summary = kill_one_replica_under_load(stack, 2, figures)
    assert summary.failed == 0, summary.as_dict()
