"""`POST /v1/training-jobs` -> RabbitMQ -> dispatcher -> Ray Jobs API -> job record, for real."""

import time
import uuid
from typing import Any

import httpx
from mlflow.tracking import MlflowClient

from cluster.sandbox import run_cli
from core.health import wait_until
from tests.training_jobs_helpers import QUICK, dead_letters, get_job, post_job, publish_raw, wait_job


def test_invalid_specs_get_a_422_naming_the_field(stack):
    cases: list[tuple[dict[str, Any], str]] = [
        ({"kind": "deploy"}, "kind"),
        ({"config": "no-such-config"}, "config"),
        ({"config": "../etc/passwd"}, "config"),
        ({"overrides": {"train.epochs": 0}}, "train.epochs"),
        ({"overrides": {"model.no_such_field": 1}}, "model.no_such_field"),
        ({"overrides": {"Train..x": 1}}, "overrides"),
        ({"priority": "high"}, "priority"),
    ]
    for body, field in cases:
        response = post_job(stack, body)
        assert response.status_code == 422, (body, response.text)
        error = response.json()["error"]
        assert error["code"] == "validation_error"
        assert any(field in ".".join(map(str, d["loc"])) for d in error["details"]), (body, error)
    assert stack.http.post("/v1/training-jobs", json={}, timeout=30).status_code == 401


def test_unknown_or_malformed_job_ids(stack):
    missing = stack.http.get(f"/v1/training-jobs/{uuid.uuid4()}", headers=stack.auth, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    malformed = stack.http.get("/v1/training-jobs/not-a-uuid", headers=stack.auth, timeout=30)
    assert malformed.status_code == 422


def test_a_list_parameter_given_twice_is_refused_not_guessed(stack):
    """Which of two `before` values a server uses differs between frameworks: the API picks none."""
    query = [("before", "2026-01-01T00:00:00Z"), ("before", "2020-01-01T00:00:00Z"), ("limit", "5")]
    response = stack.http.get("/v1/training-jobs", params=query, headers=stack.auth, timeout=30)
    assert response.status_code == 422, response.text
    details = response.json()["error"]["details"]
    assert [(d["loc"], d["type"]) for d in details] == [(["query", "before"], "single_value")]
    # Without a key the answer is still the 401, not a hint about the parameters.
    assert stack.http.get("/v1/training-jobs", params=query, timeout=30).status_code == 401
    single = stack.http.get("/v1/training-jobs", params=query[1:], headers=stack.auth, timeout=30)
    assert single.status_code == 200, single.text


def test_job_runs_once_per_idempotency_key_and_registers_a_model(stack, trained):
    key = f"nightly-{uuid.uuid4().hex}"
    body: dict[str, Any] = {"kind": "train", "config": "adult", "overrides": QUICK}
    first = post_job(stack, body, {"Idempotency-Key": key, "traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"})
    assert first.status_code == 202, first.text
    job = first.json()
    assert first.headers["Location"] == f"/v1/training-jobs/{job['id']}"
    assert job["state"] == "queued" and job["attempts"] == 0 and job["trace_id"] == "ab" * 16

    replay = post_job(stack, body, {"Idempotency-Key": key})
    assert replay.status_code == 202 and replay.json()["id"] == job["id"]
    assert replay.headers.get("Idempotent-Replayed") == "true"
    conflict = post_job(stack, {**body, "overrides": {"train.epochs": 3}}, {"Idempotency-Key": key})
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "idempotency_conflict"

    done = wait_job(stack, job["id"], {"succeeded"})
    assert done["attempts"] == 1 and done["ray_job_id"] == f"training-{job['id']}-1"
    assert done["model_name"] == "adult-income" and done["model_version"]
    assert isinstance(done["promoted"], bool) and 0.5 < done["test_metrics"]["roc_auc"] <= 1
    assert [e["state"] for e in done["events"]] == ["queued", "submitted", "running", "succeeded"]
    version = MlflowClient(stack.settings.mlflow.tracking_uri).get_model_version("adult-income", done["model_version"])
    assert version.run_id == done["mlflow_run_id"]

    def metric(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))

    def counted() -> bool:
        text = httpx.get(f"{stack.settings.dispatcher.url}/metrics", timeout=10).text
        return (
            metric(text, 'training_jobs{state="succeeded"}') >= 1
            and metric(text, 'training_job_attempts_total{kind="train",outcome="succeeded"}') >= 1
            and metric(text, 'training_job_duration_seconds_count{kind="train",outcome="succeeded"}') >= 1
            and "training_queue_lag_seconds" in text
        )

    assert wait_until(counted, 30)

    listed = stack.http.get("/v1/training-jobs", params={"state": "succeeded"}, headers=stack.auth, timeout=30).json()[
        "jobs"
    ]
    assert job["id"] in [j["id"] for j in listed]


def test_permanent_failure_is_dead_lettered_and_can_be_requeued(stack):
    overrides = {**QUICK, "data.train_uri": "data/nonexistent/adult.data.gz", "promotion.enabled": False}
    job = post_job(stack, {"overrides": overrides}).json()
    dead = wait_job(stack, job["id"], {"dead_lettered"}, timeout_s=300)
    assert dead["attempts"] == stack.settings.dispatcher.max_attempts == 2
    assert "gave up after 2 attempts" in dead["last_error"] and "nonexistent" in dead["last_error"]
    queue = stack.settings.training.dead_letter_queue
    copies = [m for m in dead_letters(queue) if m.get("x-job-id") == job["id"]]
    assert len(copies) == 1 and "nonexistent" in copies[0]["x-error"]
    # A job that has ended cannot be cancelled: 409, and it stays as it ended.
    cancel = stack.http.delete(f"/v1/training-jobs/{job['id']}", headers=stack.auth, timeout=30)
    assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "job_finished", cancel.text
    assert get_job(stack, job["id"])["state"] == "dead_lettered"

    shown = run_cli("services.dispatcher", "show", job["id"], env=stack.env, timeout=60)
    assert shown.returncode == 0 and '"dead_lettered"' in shown.stdout, shown.stderr
    listed = run_cli("services.dispatcher", "list", "--state", "dead_lettered", env=stack.env, timeout=60)
    assert job["id"] in listed.stdout

    requeued = run_cli("services.dispatcher", "requeue", job["id"], env=stack.env, timeout=60)
    assert requeued.returncode == 0, requeued.stderr
    assert "1 dead-letter message(s) removed" in requeued.stdout
    assert not [m for m in dead_letters(queue) if m.get("x-job-id") == job["id"]]
    again = wait_job(stack, job["id"], {"dead_lettered"}, timeout_s=300)
    assert again["attempts"] == 4  # attempt numbers keep counting: each is its own Ray submission
    assert run_cli("services.dispatcher", "requeue", str(uuid.uuid4()), env=stack.env, timeout=60).returncode == 1


def test_malformed_message_is_dead_lettered_and_the_dispatcher_keeps_running(stack):
    marker = f"garbage-{uuid.uuid4().hex}".encode()
    publish_raw(stack.settings.training.exchange, marker)
    deadline = time.monotonic() + 60
    found: list[dict[str, object]] = []
    while time.monotonic() < deadline and not found:
        found = [m for m in dead_letters(stack.settings.training.dead_letter_queue) if m["body"] == marker]
        time.sleep(0.5)
    assert found and "malformed message" in str(found[0]["x-error"])
    metrics = httpx.get(f"{stack.settings.dispatcher.url}/metrics", timeout=10).text
    assert 'training_dead_lettered_messages_total{reason="malformed"}' in metrics
    # Still consuming: the next request is claimed and attempted.
    job = post_job(stack, {"overrides": {**QUICK, "data.train_uri": "data/nonexistent.csv"}}).json()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and get_job(stack, job["id"])["attempts"] == 0:
        time.sleep(0.5)
    assert get_job(stack, job["id"])["attempts"] >= 1
