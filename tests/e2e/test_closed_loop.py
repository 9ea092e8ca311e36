"""The closed loop on the running stack: wrong feedback -> live accuracy -> Prometheus alert ->
Alertmanager -> the API's webhook -> a retraining job on Ray -> a new registered version,
promoted and served if it is better; and one trace id across every component it crossed."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from cluster.demo import wait_for_version
from cluster.sandbox import Stack
from serve_apps.schemas import EXAMPLE_ROW
from services.ray_submission import jobs_client
from tests.conftest import ALERT_WEBHOOK_TOKEN
from tests.integration.test_prometheus import wait_for
from tests.stack_probes import current_model, firing_alerts, until
from tests.training_jobs_helpers import wait_job

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((REPO / "cluster" / "grafana" / "dashboards").glob("*.json"))
RULES = sorted((REPO / "cluster" / "prometheus" / "rules").glob("*.yml"))


def _alertmanager_alerts(stack: Stack, version: str) -> list[dict[str, Any]]:
    response = httpx.get(
        f"{stack.settings.alertmanager_url}/api/v2/alerts",
        params={"filter": ['alertname="ModelAccuracyLow"', f'model_version="{version}"']},
        timeout=10,
    )
    return list(response.json())


def _alert_jobs(stack: Stack) -> list[dict[str, Any]]:
    response = stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth)
    assert response.status_code == 200, response.text
    return [j for j in response.json()["jobs"] if (j["idempotency_key"] or "").startswith("alert:ModelAccuracyLow:")]


def _serve_log_lines(stack: Stack, deployment: str, trace_id: str) -> list[dict[str, Any]]:
    temp = stack.settings.ray.resolved_temp_dir
    lines = []
    for path in glob.glob(f"{temp}/session_latest/logs/serve/replica_inference_{deployment}_*.log"):
        lines += [json.loads(line) for line in Path(path).read_text().splitlines() if trace_id in line]
    return lines


@pytest.fixture(scope="module")
def champion(stack, trained):
    """Whichever version earlier tests left as champion, once it serves."""
    ready = until("a served model", lambda: stack.http.get("/readyz").status_code == 200, 60)
    assert ready
    return current_model(stack)


def test_one_predictions_trace_is_in_the_header_the_logs_and_the_spans(stack, champion, otlp_sink):
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    response = stack.http.post(
        "/v1/predict",
        json={"instances": [EXAMPLE_ROW]},
        headers={**stack.auth, "traceparent": traceparent},
    )
    assert response.status_code == 200
    trace_id = response.headers["x-trace-id"]
    assert trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert response.headers["traceparent"].split("-")[1] == trace_id
    request_id = response.json()["request_id"]
    # Earlier tests may have sent the same trace id; wait for this request's own line (the
    # replica writes its buffered log lines at least once a second).
    mine = lambda: [x for x in _serve_log_lines(stack, "Ingress", trace_id) if x.get("request_id") == request_id]  # noqa: E731
    assert until("this request's Ingress log line", mine, 30)
    lines = _serve_log_lines(stack, "Ingress", trace_id)
    assert all(line["trace_id"] == trace_id and line["span_id"] for line in lines)
    spans = until(
        "the ingress's spans",
        lambda: (s := otlp_sink.spans_of(trace_id)) and {"inference-api"} == {x.service for x in s} and s,
        30,
    )
    # The ingress's server span is a child of the caller's span, the model call a child of it.
    server = [s for s in spans if s.parent_span_id == "00f067aa0ba902b7"]
    assert server
    model = [s for s in spans if s.name == "model.predict"]
    assert model and model[0].parent_span_id in {s.span_id for s in spans}


@pytest.fixture
def wrong_feedback_removed_afterwards(stack):
    """The wrong labels would keep the accuracy alert up for the window; the tests after this one
    must not see alerts or retraining they did not cause."""
    yield
    with psycopg.connect(stack.settings.database.url.get_secret_value()) as conn:
        conn.execute("DELETE FROM feedback")


def test_wrong_feedback_retrains_and_the_better_model_serves(
    stack, champion, otlp_sink, wrong_feedback_removed_afterwards
):
    version = champion["version"]
    assert not _alert_jobs(stack)
    predicted = stack.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW] * 30}, headers=stack.auth).json()
    for index, prediction in enumerate(predicted["predictions"]):
        wrong = ">50K" if prediction["label"] == "<=50K" else "<=50K"
        body = {"request_id": predicted["request_id"], "index": index, "label": wrong}
        response = stack.http.post("/v1/feedback", json=body, headers=stack.auth)
        assert response.status_code == 201, response.text

    # 1. Live accuracy, computed from the stored feedback, drops below the threshold in Prometheus.
    accuracy = wait_for(stack, f'model_live_accuracy{{model_version="{version}"}}', 60)
    assert float(accuracy[0]["value"][1]) < stack.settings.accuracy.threshold
    # 2. The rule fires, 3. Alertmanager holds it, 4. the webhook queued exactly one retraining job.
    fired = until(
        "ModelAccuracyLow firing in Prometheus",
        lambda: firing_alerts(stack, "ModelAccuracyLow", model_version=version),
        60,
    )
    assert fired[0]["labels"]["action"] == "retrain"
    held = until("the alert in Alertmanager", lambda: _alertmanager_alerts(stack, version), 60)
    jobs = until("a retraining job", lambda: _alert_jobs(stack), 60)
    assert len(jobs) == 1
    job = wait_job(stack, jobs[0]["id"], {"succeeded"}, 600)
    # RETRAIN_OVERRIDES of the test stack, and the labelled feedback (RETRAIN_USE_FEEDBACK).
    assert job["kind"] == "train"
    assert job["overrides"] == {"feedback.enabled": True, "train.epochs": 3, "train.patience": 2}
    assert job["reason"].startswith("ModelAccuracyLow: ") and job["events"][0]["message"].startswith("accepted: ")
    # The job trains the alert's model, with the one shipped config that trains it.
    assert held[0]["labels"]["model"] == stack.settings.model.name and job["config"] == "adult"

    # 5. A new version is registered by the job's run, which carries the trace id of the webhook call.
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    new = client.get_model_version(stack.settings.model.name, job["model_version"])
    assert int(new.version) > int(version)
    run = client.get_run(str(new.run_id))
    assert run.data.tags["trace_id"] == job["trace_id"]
    # 6. Promoted and served if better, else the champion keeps serving; the decision is recorded either way.
    assert new.tags["promotion.decision"] == ("promoted" if job["promoted"] else "rejected")
    if job["promoted"]:
        assert wait_for_version(stack.settings, new.version, 60)
        assert current_model(stack)["version"] == new.version
    else:
        assert current_model(stack)["version"] == version

    # One alert episode, one job: Alertmanager's repeats of this episode replay the same job.
    alert = held[0]
    repeat = {
        "status": "firing",
        "alerts": [{"status": "firing", "labels": alert["labels"], "startsAt": alert["startsAt"],
                    "fingerprint": alert["fingerprint"]}],
    }  # fmt: skip
    replay = stack.http.post(
        "/v1/alerts/alertmanager",
        json=repeat,
        headers={"Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"},
    )
    assert replay.status_code == 200
    assert replay.json()["retrain"] == [
        {
            "alert": "ModelAccuracyLow",
            "fingerprint": alert["fingerprint"],
            "model": stack.settings.model.name,
            "config": "adult",
            "job_id": job["id"],
            "created": False,
        }
    ]
    assert replay.json()["refused"] == []
    assert len(_alert_jobs(stack)) == 1

    # The job's trace crossed the webhook's ingress, the dispatcher (through RabbitMQ) and the
    # training job (through the Ray job's environment): spans and JSON logs of each carry it.
    trace_id = job["trace_id"]
    # The dispatch span ends after the job's row is final, and spans leave in batches: wait for all.
    crossed = {"inference-api", "dispatcher", "trainer"}
    until(f"spans from {crossed}", lambda: crossed <= {s.service for s in otlp_sink.spans_of(trace_id)}, 30)
    dispatcher_log = (stack.settings.logs_dir / "dispatcher.log").read_text().splitlines()
    assert any(trace_id in line and json.loads(line)["service"] == "dispatcher" for line in dispatcher_log)
    job_logs = jobs_client(stack.settings).get_job_logs(job["ray_job_id"])
    trainer_lines = [json.loads(line) for line in job_logs.splitlines() if line.startswith("{") and trace_id in line]
    assert any(line["service"] == "trainer" for line in trainer_lines)
    assert _serve_log_lines(stack, "Ingress", trace_id)


def _varied_adult_traffic(stack: Stack, rows: int) -> None:
    """Rows of Adult's test split, so the drift monitor has a window of real inputs to judge."""
    from jobs.config import load_config
    from jobs.data.loading import load_test_frame

    frame = load_test_frame(load_config(REPO / "jobs" / "configs" / "adult.yaml")).drop(columns=["income"]).head(rows)
    records = [{k: (None if v != v else v) for k, v in r.items()} for r in frame.to_dict("records")]
    for start in range(0, len(records), 50):
        response = stack.http.post("/v1/predict", json={"instances": records[start : start + 50]}, headers=stack.auth)
        assert response.status_code == 200, response.text


def test_rays_generated_dashboards_resolve_to_the_provisioned_prometheus(stack):
    generated = sorted(
        Path(stack.settings.ray.resolved_temp_dir).glob("session_latest/metrics/grafana/dashboards/*.json")
    )
    assert generated, "Ray wrote no Grafana dashboards"
    for path in generated:
        dashboard = json.loads(path.read_text())
        variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
        assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
        refs = set()
        for panel in dashboard.get("panels", []):
            for item in [panel, *panel.get("targets", [])]:
                ref = item.get("datasource")
                refs.add(json.dumps(ref, sort_keys=True) if isinstance(ref, dict) else str(ref))
        assert refs <= {"None", "${datasource}", '{"type": "prometheus", "uid": "${datasource}"}', "-- Grafana --"}, (
            path.name,
            refs,
        )
