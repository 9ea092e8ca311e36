"""Polling the running test stack for what the tests wait on: a condition, an alert firing in
Prometheus, the model the API serves."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import psutil
from mlflow.tracking import MlflowClient

from cluster.demo import wait_for_version
from cluster.sandbox import Stack
from cluster.supervisor import managed, read_pid, session_members
from core.health import wait_until
from core.settings import Settings
from services.ray_submission import jobs_client


def until(what: str, probe: Callable[[], Any], timeout_s: float = 120) -> Any:
    """The first truthy value `probe` returns, polled every second; fails naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if found := probe():
            return found
        time.sleep(1)
    raise AssertionError(f"{what}: not seen within {timeout_s}s")


def firing_alerts(stack: Stack, alertname: str, **labels: str) -> list[dict[str, Any]]:
    """Alerts named `alertname` firing in the stack's Prometheus whose labels include `labels`."""
    alerts = httpx.get(f"{stack.settings.prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return [
        a for a in alerts
        if a["labels"]["alertname"] == alertname and a["state"] == "firing"
        and all(a["labels"].get(k) == v for k, v in labels.items())
    ]  # fmt: skip


def current_model(stack: Stack) -> dict[str, Any]:
    """`GET /v1/models/current` through the edge."""
    response = stack.http.get("/v1/models/current", headers=stack.auth, timeout=10)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@contextmanager
def champion_client(stack: Stack) -> Iterator[httpx.Client]:
    """A client of the stack's API with its key, once the replica serves whichever version is the
    champion now (the session's first, or one an earlier test promoted)."""
    champion = MlflowClient(stack.settings.mlflow.tracking_uri).get_model_version_by_alias(
        stack.settings.model.name, stack.settings.champion_alias
    )
    assert wait_for_version(stack.settings, str(champion.version), 60), "the champion was not picked up"
    with httpx.Client(base_url=stack.api_url, verify=stack.verify, timeout=60, headers=stack.auth) as client:
        yield client


def train_worker_pids(settings: Settings) -> list[int]:
    """The Ray Train worker processes of the stack `settings` describe (the members of its Ray
    head's session; another stack's workers on this machine are not)."""
    leader = read_pid(managed(settings, "ray"))
    assert leader is not None, "the stack's Ray head is not running"
    pids = []
    for proc in session_members(leader):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                pids.append(proc.pid)
        except psutil.Error:
            continue
    return pids


def kill_a_train_worker_after(settings: Settings, job_id: str, reports: int = 2, timeout_s: float = 600) -> None:
    """SIGKILL one Ray Train worker of the stack once job `job_id` has reported `reports` epochs,
    each with its checkpoint."""
    jobs = jobs_client(settings)
    reported = f"Reporting training result {reports}:"
    assert wait_until(lambda: reported in jobs.get_job_logs(job_id), timeout_s, max_wait_s=1), reported
    workers = train_worker_pids(settings)
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)


def assert_resumed(settings: Settings, run_id: str, epochs: int) -> None:
    """Run `run_id` logged every epoch and resumed rather than restarted after a killed worker: at
    most the epoch in flight at the kill is logged twice."""
    history = MlflowClient(settings.mlflow.tracking_uri).get_metric_history(run_id, "val_loss")
    steps = sorted(m.step for m in history)
    assert set(steps) == set(range(epochs)) and len(steps) <= epochs + 1, steps
