"""The faults asynchronous training and the record of predictions must survive: a killed
dispatcher, a broker restart, a database restart and an MLflow crash. Every accepted job
completes exactly once; every answered prediction and accepted feedback is stored exactly once."""

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack, run_cli
from cluster.supervisor import managed, read_pid
from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW
from services.ray_submission import jobs_client
from tests.reliability.load import SteadyLoad
from tests.training_jobs_helpers import QUICK, post_job, wait_job

NO_PROMOTION = {**QUICK, "promotion.enabled": False}


def _versions(stack: Stack) -> set[str]:
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
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


def _kill_mlflow(stack: Stack) -> None:
    """A crash of the whole MLflow server: its process session, workers included."""
    pid = read_pid(managed(stack.settings, "mlflow"))
    assert pid is not None
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    assert wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 30)


def _restart_mlflow(stack: Stack) -> None:
    """What compose's restart policy does for the container: `cluster up` starts what is down."""
    result = run_cli("cluster", "up", env=stack.env, timeout=300)
    assert result.returncode == 0 and "mlflow: started" in result.stdout, result.stdout + result.stderr


def _post_feedback_until_accepted(stack: Stack, request_id: str, label: str) -> int:
    """A client honouring the API's 503 + Retry-After: nothing was stored, so sending again is safe."""
    for _ in range(60):
        try:
            response = stack.http.post(
                "/v1/feedback", json={"request_id": request_id, "index": 0, "label": label}, headers=stack.auth
            )
        except httpx.HTTPError:
            time.sleep(1)
            continue
        if response.status_code != 503:
            return response.status_code
        time.sleep(1)
    raise AssertionError(f"feedback for {request_id} never accepted")


def _predicted_label(stack: Stack) -> str:
    """What the champion answers for the load's row (every request of the load sends the same)."""
    response = stack.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=stack.auth)
    assert response.status_code == 200, response.text
    return str(response.json()["predictions"][0]["label"])


def _stored(stack: Stack, table: str, request_ids: list[str]) -> dict[str, int]:
    assert stack.settings.database.url is not None
    dsn = stack.settings.database.url.get_secret_value()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            f"SELECT request_id, count(*) FROM {table} WHERE request_id = ANY(%s) GROUP BY request_id",
            (request_ids,),
        ).fetchall()
    return {str(r): int(n) for r, n in rows}


def test_broker_database_and_mlflow_restarts_under_load_lose_nothing_accepted(stack, trained, figures):
    """RabbitMQ's app stopped and started, PostgreSQL restarted and MLflow killed and restarted,
    while clients send predictions and feedback and training jobs are queued and running: every
    accepted job, prediction record and feedback record is there exactly once afterwards."""
    before = _versions(stack)
    accepted: list[dict[str, Any]] = []
    feedback: dict[str, int] = {}
    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=40, max_duration_s=1200) as load:
        load.wait_for_count(100)
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
        # Correct labels: wrong ones would rightly fire the accuracy alert and retrain a champion.
        label = _predicted_label(stack)
        answered = [o for o in load.outcomes if o.request_id is not None]
        for outcome in answered[-20:]:
            assert outcome.request_id is not None
            feedback[outcome.request_id] = _post_feedback_until_accepted(stack, outcome.request_id, label)

        _kill_mlflow(stack)
        _restart_mlflow(stack)
        completed = [wait_job(stack, job["id"], {"succeeded"}, timeout_s=900) for job in accepted]
    summary = load.summary()
    figures["restarts_under_load"] = {
        **summary.as_dict(),
        "jobs_accepted": len(accepted),
        "jobs_succeeded": sum(job["state"] == "succeeded" for job in completed),
        "job_attempts": [job["attempts"] for job in completed],
        "feedback_accepted": len(feedback),
    }

    assert len(completed) == len(accepted) == 3
    for job in completed:
        # One Ray job per attempt, never two for the same attempt.
        expected = [f"training-{job['id']}-{n}" for n in range(1, job["attempts"] + 1)]
        assert sorted(_ray_jobs_for(stack, job["id"])) == expected
    assert _versions(stack) - before == {job["model_version"] for job in completed}
    assert psutil.pid_exists(_dispatcher_pid(stack))  # the same dispatcher, reconnected by itself

    # Predictions never depended on the broker, the database or MLflow.
    assert summary.failed == 0, summary.as_dict()
    served = [o.request_id for o in load.outcomes if o.request_id is not None]
    assert len(served) == summary.requests
    # Every answered prediction is recorded once (the replica buffers rows while PostgreSQL is away).
    assert wait_until(lambda: len(_stored(stack, "predictions", served)) == len(served), 60), (
        len(_stored(stack, "predictions", served)),
        len(served),
    )
    assert set(_stored(stack, "predictions", served).values()) == {1}
    assert set(feedback.values()) <= {200, 201}, feedback  # 200: an earlier try had landed
    assert _stored(stack, "feedback", list(feedback)) == dict.fromkeys(feedback, 1)
