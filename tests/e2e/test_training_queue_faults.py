"""The faults asynchronous training must survive: a killed dispatcher, a broker restart and a
database restart. Every accepted job completes, and exactly once."""

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import psutil
from mlflow.tracking import MlflowClient

from cluster.health import wait_until
from cluster.jobs_api import jobs_client
from tests.conftest import Stack, run_cli
from tests.training_jobs_helpers import QUICK, post_job, wait_job

NO_PROMOTION = {**QUICK, "promotion.enabled": False}


def _versions(stack: Stack) -> set[str]:
    client = MlflowClient(stack.settings.mlflow_tracking_uri)
    return {v.version for v in client.search_model_versions("name='adult-income'")}


def _ray_jobs_for(stack: Stack, job_id: str) -> list[str]:
    client = jobs_client(stack.settings)
    return [str(j.submission_id) for j in client.list_jobs() if (j.metadata or {}).get("training_job_id") == job_id]


def _dispatcher_pid(stack: Stack) -> int:
    return int((stack.settings.state_dir / "pids" / "dispatcher.pid").read_text().strip())


def _restart_dispatcher(stack: Stack) -> None:
    result = run_cli("cluster", "up", env=stack.env, timeout=300)
    assert result.returncode == 0 and "dispatcher: started" in result.stdout, result.stdout + result.stderr


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=180)


def test_dispatcher_killed_while_holding_a_request_completes_it_exactly_once(stack, trained):
    before = _versions(stack)
    job = post_job(stack, {"overrides": NO_PROMOTION}).json()
    wait_job(stack, job["id"], {"running"})  # claimed, Ray job started, message not yet acknowledged

    pid = _dispatcher_pid(stack)
    os.kill(pid, signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 30)
    _restart_dispatcher(stack)

    done = wait_job(stack, job["id"], {"succeeded"})
    assert done["attempts"] == 1
    assert _ray_jobs_for(stack, job["id"]) == [f"training-{job['id']}-1"]
    assert _versions(stack) - before == {done["model_version"]}
    assert [e["state"] for e in done["events"]].count("submitted") == 1


def _pg_cluster() -> tuple[str, str]:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    return version, "main"


def test_broker_and_database_restarts_lose_no_accepted_job(stack, trained):
    before = _versions(stack)
    accepted: list[dict[str, Any]] = []
    first = post_job(stack, {"overrides": NO_PROMOTION})
    assert first.status_code == 202
    accepted.append(first.json())
    wait_job(stack, accepted[0]["id"], {"running"})

    _run("rabbitmqctl", "stop_app")
    try:
        # Accepted while the broker is down: stored, published by the relay once it is back.
        during = post_job(stack, {"overrides": NO_PROMOTION})
        assert during.status_code == 202, during.text
        accepted.append(during.json())
    finally:
        _run("rabbitmqctl", "start_app")

    version, name = _pg_cluster()
    _run("pg_ctlcluster", "--skip-systemctl-redirect", version, name, "restart")
    after = post_job(stack, {"overrides": NO_PROMOTION})
    assert after.status_code == 202, after.text
    accepted.append(after.json())

    completed = [wait_job(stack, job["id"], {"succeeded"}, timeout_s=900) for job in accepted]
    assert len(completed) == len(accepted) == 3
    for job in completed:
        # One Ray job per attempt, never two for the same attempt.
        expected = [f"training-{job['id']}-{n}" for n in range(1, job["attempts"] + 1)]
        assert sorted(_ray_jobs_for(stack, job["id"])) == expected
    assert _versions(stack) - before == {job["model_version"] for job in completed}
    assert psutil.pid_exists(_dispatcher_pid(stack))  # the same dispatcher, reconnected by itself
