"""The Gradio app wired to a fake API (httpx mock transport), served in-process and driven
with gradio_client exactly as the integration test drives the real one."""

import json
import re
from collections.abc import Iterator

import gradio as gr
import httpx
import pytest
from gradio_client import Client

from cluster.sandbox import free_port
from core.settings import Settings
from ui.actions import UiActions
from ui.app import build_app, cancel_outputs, card_outputs, follow, monitoring_outputs, rollout_outputs
from ui.http import InferenceApi, MlflowRest
from ui.launch import launch_options, login_credentials

KEY = "ui-key"
# A key that may only predict: everything else answers 403 missing_scope, as the API does.
PREDICT_KEY = "predict-only-key"
SCOPES = {KEY: {"predict", "feedback", "train"}, PREDICT_KEY: {"predict"}}
# adult-income's rollout service has a canary of version 4 at its second step (`rollout` of
# `GET /v1/models/{name}`); fleet-risk's API could not read its rollout state.
ROLLOUT = {
    "rollout": {
        "id": 7,
        "model_name": "adult-income",
        "kind": "canary",
        "state": "active",
        "champion_version": "3",
        "challenger_version": "4",
        "step": 1,
        "share": 0.25,
        "policy": {"mode": "canary", "canary_steps": [0.05, 0.25, 1.0]},
        "job_id": "0b7f",
        "started_at": "2026-01-01T10:00:00+00:00",
        "step_started_at": "2026-01-01T10:30:00+00:00",
        "ended_at": None,
        "reason": None,
        "figures": {"rows": 600, "agreement": 0.98},
    },
    "probation": None,
    "events": [
        {
            "rollout_id": 7,
            "at": "2026-01-01T10:30:00+00:00",
            "kind": "step",
            "message": "next step: 25%",
            "figures": {"rows": 300, "agreement": 0.99},
        },
        {
            "rollout_id": 7,
            "at": "2026-01-01T10:00:00+00:00",
            "kind": "started",
            "message": "canary at 5%",
            "figures": {},
        },
    ],
}
CURRENT = {
    "rollout": ROLLOUT,
    "name": "adult-income", "version": "3", "run_id": "run3", "alias": "champion", "loaded_at": 0,
    "task": "classification", "target": "income", "classes": ["<=50K", ">50K"], "metrics": {"test_accuracy": 0.85},
    "features": [
        {"name": "age", "kind": "numeric", "categories": [], "nullable": False},
        {"name": "sex", "kind": "categorical", "categories": ["Female", "Male"], "nullable": False},
    ],
}  # fmt: skip
# A second served model: another task, other features and classes.
FLEET = {
    **CURRENT, "name": "fleet-risk", "version": "2", "run_id": "run-f2", "target": "risk", "classes": ["high", "low"],
    "rollout": None, "rollout_error": "the rollout state could not be read: timeout",
    "features": [{"name": "mileage", "kind": "numeric", "categories": [], "nullable": False}],
}  # fmt: skip
SERVED = {"adult-income": CURRENT, "fleet-risk": FLEET}
# The monitor's report on adult-income v3 (`GET /v1/models/{name}/monitoring`); fleet-risk's API
# answers 404 there, as an API from before the route would.
MONITORING = {
    "model": "adult-income", "version": "3", "status": "ok", "computed_at": "2026-01-01T10:00:00+00:00",
    "window_rows": 500, "min_rows": 200, "drift_share": 0.5, "drift_share_threshold": 0.5, "dataset_drift": True,
    "features": [
        {"name": "age", "kind": "numeric", "test": "wasserstein", "score": 0.02, "threshold": 0.1,
         "drifted": False, "psi": 0.01, "window_rows": 500},
        {"name": "sex", "kind": "categorical", "test": "jensen_shannon", "score": 0.31, "threshold": 0.1,
         "drifted": True, "psi": 0.42, "window_rows": 500},
    ],
    "prediction": {"name": "prediction", "kind": "categorical", "test": "jensen_shannon", "score": 0.05,
                   "threshold": 0.1, "drifted": False, "psi": 0.03, "window_rows": 500},
    "estimated_accuracy": 0.78, "estimated_roc_auc": 0.88, "reference_accuracy": 0.85,
    "measured_accuracy": None, "measured_feedback": 0,
}  # fmt: skip
JOB = {"id": "0b7f", "kind": "train", "config": "adult", "overrides": {}, "state": "queued", "attempts": 0,
       "max_attempts": 3, "created_at": "2026-01-01T00:00:00Z",
       "created_by": {"kind": "api_key", "key_id": "3fa2c1d0e9b8", "name": "ui-20260101000000"}}  # fmt: skip
FINISHED = {**JOB, "id": "d0e5", "state": "succeeded", "attempts": 1, "model_version": "4", "promoted": False}


def route_scope(request: httpx.Request) -> str:
    path = request.url.path
    if path.startswith("/v1/training-jobs"):
        return "train"
    return "feedback" if path == "/v1/feedback" else "predict"


def missing_scope(scope: str) -> httpx.Response:
    message = f"this API key (predict-only) lacks the '{scope}' scope; an operator can grant it"
    details = [{"loc": ["header", "Authorization"], "msg": f"requires the {scope!r} scope", "type": "missing_scope",
                "ctx": {"scope": scope}}]  # fmt: skip
    error = {"code": "missing_scope", "message": message, "request_id": "rid-403", "details": details}
    return httpx.Response(403, json={"error": error})


def training_jobs(request: httpx.Request) -> httpx.Response:
    path, method = request.url.path, request.method
    if path == "/v1/training-jobs" and method == "POST":
        spec = json.loads(request.content)
        if spec.get("config") == "busy":
            error = {"code": "job_limit_exceeded", "message": "this key has 2 jobs queued or running, its limit"}
            return httpx.Response(429, json={"error": error}, headers={"Retry-After": "30"})
        return httpx.Response(202, json={**JOB, **spec, "config": "adult"})
    if path == "/v1/training-jobs":
        return httpx.Response(200, json={"jobs": [JOB]})
    job_id = path.removeprefix("/v1/training-jobs/")
    if job_id == JOB["id"] and method == "DELETE":
        event = {"at": "2026-01-01T00:00:05Z", "state": "cancelled", "attempt": 0, "message": "cancelled",
                 "actor": JOB["created_by"]}  # fmt: skip
        return httpx.Response(200, json={**JOB, "state": "cancelled", "events": [event]})
    if job_id == JOB["id"]:
        return httpx.Response(200, json={**JOB, "state": "running", "events": []})
    if job_id == FINISHED["id"] and method == "DELETE":
        error = {"code": "job_finished", "message": f"job {job_id} has already ended: succeeded"}
        return httpx.Response(409, json={"error": error})
    if job_id == FINISHED["id"]:
        return httpx.Response(200, json=FINISHED)
    return httpx.Response(404, json={"error": {"code": "job_not_found", "message": f"no training job {job_id!r}"}})


def fake_api(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if path == "/openapi.json":
        examples = [{"instances": [{"age": 39, "sex": "Male"}]}]
        return httpx.Response(200, json={"components": {"schemas": {"PredictRequest": {"examples": examples}}}})
    key = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if key not in SCOPES:
        return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "invalid API key"}})
    if route_scope(request) not in SCOPES[key]:
        return missing_scope(route_scope(request))
    if path == "/v1/models/current":
        return httpx.Response(200, json=CURRENT)
    if path == "/v1/models":
        listed = [
            {"name": n, "default": n == "adult-income", "champion_version": m["version"]} for n, m in SERVED.items()
        ]
        return httpx.Response(200, json={"models": sorted(listed, key=lambda m: str(m["name"]), reverse=True)})
    if path == "/v1/models/adult-income/monitoring":
        return httpx.Response(200, json=MONITORING)
    name = path.removeprefix("/v1/models/").removesuffix("/predict")
    if path.startswith("/v1/models/") and name not in SERVED:
        return httpx.Response(404, json={"error": {"code": "model_not_found", "message": f"no model {name!r}"}})
    if path.startswith("/v1/models/") and not path.endswith("/predict"):
        return httpx.Response(200, json=SERVED[name])
    if path == "/v1/models/fleet-risk/predict":
        prediction = {"label": "high", "probability": 0.6, "probabilities": {"high": 0.6, "low": 0.4}}
        model = {"name": "fleet-risk", "version": "2", "run_id": "run-f2"}
        return httpx.Response(200, json={"request_id": "rid2", "model": model, "predictions": [prediction]})
    if path in {"/v1/predict", "/v1/models/adult-income/predict"}:
        row = json.loads(request.content)["instances"][0]
        if not isinstance(row.get("age"), int):
            details = [{"loc": ["body", "instances", 0, "age"], "msg": "Input should be a valid number"}]
            return httpx.Response(422, json={"error": {"message": "invalid request", "details": details}})
        prediction = {"label": ">50K", "probability": 0.7, "probabilities": {"<=50K": 0.3, ">50K": 0.7}}
        model = {"name": "adult-income", "version": "3", "run_id": "run3"}
        return httpx.Response(200, json={"request_id": "rid1", "model": model, "predictions": [prediction]})
    if path == "/v1/feedback":
        body = json.loads(request.content)
        return httpx.Response(201, json={**body, "outcome": "recorded", "predicted": ">50K", "correct": False})
    if path.startswith("/v1/training-jobs"):
        return training_jobs(request)
    return httpx.Response(404, json={"error": {"message": f"no route {path}"}})


def fake_mlflow(request: httpx.Request) -> httpx.Response:
    path, params = request.url.path, request.url.params
    if path.endswith("/runs/get"):
        return httpx.Response(200, json={"run": {"data": {"metrics": [{"key": "val_loss"}, {"key": "test_loss"}]}}})
    if path.endswith("/metrics/get-history"):
        points = [{"step": s, "value": 0.5 - s / 10, "timestamp": s} for s in range(3)]
        return httpx.Response(200, json={"metrics": [{**p, "key": params["metric_key"]} for p in points]})
    if path.endswith("/model-versions/search"):
        tags = [{"key": "promotion.decision", "value": "promoted"}]
        return httpx.Response(200, json={"model_versions": [{"version": "3", "tags": tags}]})
    if path.endswith("/registered-models/get"):
        return httpx.Response(200, json={"registered_model": {"aliases": [{"alias": "champion", "version": "3"}]}})
    return httpx.Response(404, json={"error_code": "NOT_FOUND"})


def _serve(key: str | None) -> Iterator[str]:
    api = InferenceApi("http://api", key, transport=httpx.MockTransport(fake_api))
    mlflow = MlflowRest("http://mlflow", transport=httpx.MockTransport(fake_mlflow))
    demo = build_app(UiActions(api, mlflow, "adult-income"))
    settings = Settings(_env_file=None, ui={"port": free_port(), "username": "u", "password": "p"})
    demo.launch(**launch_options(settings, login_credentials(settings)), prevent_thread_lock=True)
    try:
        yield settings.ui.url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def ui_url() -> Iterator[str]:
    yield from _serve(KEY)


@pytest.fixture(scope="module")
def client(ui_url) -> Client:
    return Client(ui_url, auth=("u", "p"), verbose=False)


def test_named_endpoints(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {
        "/predict", "/feedback", "/form_schema", "/models", "/model_card", "/start_job", "/job_status", "/recent_jobs",
        "/cancel_job", "/model_monitoring", "/model_rollout",
    } <= endpoints  # fmt: skip


def test_form_schema_and_prediction(client):
    schema = client.predict(api_name="/form_schema")
    assert [(f["name"], f["kind"], f["choices"], f["default"]) for f in schema["fields"]] == [
        ("age", "numeric", [], 39.0),
        ("sex", "categorical", ["Female", "Male"], "Male"),
    ]
    view = client.predict({"age": 39, "sex": "Male"}, api_name="/predict")
    assert (view["label"], view["probability"], view["model_version"], view["request_id"]) == (">50K", 0.7, "3", "rid1")
    refused = client.predict({"age": "old", "sex": "Male"}, api_name="/predict")
    assert refused == {
        "error": "The API rejected the input (422): invalid request - age: Input should be a valid number"
    }


def test_every_served_model_can_be_picked(client):
    # The API's default model first, whatever the API's order.
    assert client.predict(api_name="/models") == {"models": ["adult-income", "fleet-risk"]}
    schema = client.predict("fleet-risk", api_name="/form_schema")
    assert (schema["name"], schema["model"], schema["classes"]) == ("fleet-risk", "fleet-risk v2", ["high", "low"])
    assert [f["name"] for f in schema["fields"]] == ["mileage"]
    view = client.predict({"mileage": 1000}, "fleet-risk", api_name="/predict")
    assert (view["label"], view["model_version"], view["request_id"]) == ("high", "2", "rid2")
    assert client.predict({"age": 39, "sex": "Male"}, "adult-income", api_name="/predict")["request_id"] == "rid1"
    missing = client.predict({"mileage": 1}, "no-such-model", api_name="/predict")
    assert missing["error"].startswith("Not found (404): no model 'no-such-model'")
    text, *_, data = client.predict("fleet-risk", api_name="/model_card")
    assert text.startswith("### fleet-risk v2") and data["target"] == "risk"


def test_feedback(client):
    result = client.predict("rid1", "<=50K", api_name="/feedback")
    assert (result["request_id"], result["index"], result["label"], result["outcome"]) == (
        "rid1",
        0,
        "<=50K",
        "recorded",
    )
    assert client.predict(" ", ">50K", api_name="/feedback") == {
        "error": "No prediction to give feedback on yet: predict first"
    }


def test_model_card(client):
    text, losses, scores, promotions, data = client.predict(api_name="/model_card")
    assert text.startswith("### adult-income v3")
    assert data["version"] == "3" and data["curves"] == {"val_loss": [[0.0, 0.5], [1.0, 0.4], [2.0, 0.3]]}
    # The plots: losses on one (x epoch, y value, a line per metric), the other metrics on another.
    assert losses["data"] == [[0, 0.5, "val_loss"], [1, 0.4, "val_loss"], [2, 0.3, "val_loss"]]
    assert scores["data"] == []
    assert data["promotions"][0]["decision"] == "promoted" and data["promotions"][0]["aliases"] == "champion"
    assert promotions["data"][0][:3] == ["3", "champion", "promoted"]


def test_model_monitoring(client):
    assert client.predict(api_name="/model_monitoring") == MONITORING
    assert client.predict("adult-income", api_name="/model_monitoring")["drift_share"] == 0.5
    # An API without the route (or a model it does not know): a readable error, nothing else lost.
    missing = client.predict("fleet-risk", api_name="/model_monitoring")
    assert missing["error"].startswith("Not found (404):")
    text, *_, data = client.predict("fleet-risk", api_name="/model_card")
    assert text.startswith("### fleet-risk v2") and data["notes"] == []


def test_the_model_tab_shows_the_drift_next_to_the_card():
    """What the page's Model tab puts in its monitoring part, beside (not inside) the card."""
    api = InferenceApi("http://api", KEY, transport=httpx.MockTransport(fake_api))
    actions = UiActions(api, MlflowRest("http://mlflow", transport=httpx.MockTransport(fake_mlflow)), "adult-income")
    text, rows = monitoring_outputs(actions, None)
    assert "Status **ok**" in text and "| drift share (features drifted) | 0.50 | alerts at >= 0.50" in text
    assert "**dataset drift**" in text and "| estimated accuracy" in text and "| 0.780 |" in text
    assert [row[0] for row in rows] == ["sex", "age", "(prediction)"]
    text, rows = monitoring_outputs(actions, "fleet-risk")
    assert text.startswith("#### Drift and estimated accuracy\n\n_Monitoring unavailable: Not found (404)")
    assert rows == []
    # The card of the same model says nothing of it.
    assert card_outputs(actions, "adult-income")[-1]["notes"] == []


def test_model_rollout(client):
    assert client.predict(api_name="/model_rollout") == {"name": "adult-income", "version": "3", "rollout": ROLLOUT}
    assert client.predict("fleet-risk", api_name="/model_rollout") == {
        "name": "fleet-risk", "version": "2", "rollout": None,
        "rollout_error": "the rollout state could not be read: timeout",
    }  # fmt: skip
    assert client.predict("no-such-model", api_name="/model_rollout")["error"].startswith("Not found (404):")


def test_the_model_tab_shows_the_rollout_and_its_decisions():
    api = InferenceApi("http://api", KEY, transport=httpx.MockTransport(fake_api))
    actions = UiActions(api, MlflowRest("http://mlflow", transport=httpx.MockTransport(fake_mlflow)), "adult-income")
    text, rows = rollout_outputs(actions, None)
    assert "**Challenger v4** against champion v3: canary, **active**" in text
    assert "the challenger answers **25%** of the traffic" in text and "| agreement | 0.98 |" in text
    assert [row[2] for row in rows] == ["step", "started"]
    assert rows[0][1] == "canary v4" and rows[0][4] == "paired rows 300 · agreement 0.99"
    text, rows = rollout_outputs(actions, "fleet-risk")
    assert text.endswith("_Rollout state unavailable: the rollout state could not be read: timeout_") and rows == []
    text, rows = rollout_outputs(actions, "no-such-model")
    assert text.startswith("#### Rollout\n\n_Rollout state unavailable: Not found (404)") and rows == []


def test_training_jobs(client):
    job_id, text, job = client.predict("train", "", '{"train.epochs": 2}', api_name="/start_job")
    assert job_id == JOB["id"] and job["overrides"] == {"train.epochs": 2} and "**queued**" in text
    text, job = client.predict(job_id, api_name="/job_status")
    assert job["state"] == "running" and "**running**" in text
    table, status = client.predict(api_name="/recent_jobs")
    assert table["data"][0][0] == JOB["id"] and status.startswith("1 most recent")
    _, text, job = client.predict("train", "", "{oops", api_name="/start_job")
    assert job == {
        "error": "overrides: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"
    }


def test_a_job_is_cancelled_and_shows_who_started_it(client):
    job = client.predict(JOB["id"], api_name="/cancel_job")
    assert job["state"] == "cancelled" and job["events"][0]["actor"]["name"] == "ui-20260101000000"
    table, _ = client.predict(api_name="/recent_jobs")
    assert table["data"][0][8] == "key ui-20260101000000 (id 3fa2c1d0e9b8)"


def test_cancel_failures_come_back_readable(client):
    assert client.predict(FINISHED["id"], api_name="/cancel_job") == {
        "error": f"The job has already ended (409): job {FINISHED['id']} has already ended: succeeded"
    }
    assert client.predict("nope", api_name="/cancel_job") == {"error": "Not found (404): no training job 'nope'"}
    assert client.predict(" ", api_name="/cancel_job") == {"error": "Enter a job id, or start a job, to cancel it"}


def test_the_cancel_button_shows_the_outcome():
    """What the page's button puts on the page: a line on the cancel, and the job (unchanged when
    the API refused, so that a job being followed stays followed)."""
    api = InferenceApi("http://api", KEY, transport=httpx.MockTransport(fake_api))
    actions = UiActions(api, MlflowRest("http://mlflow", transport=httpx.MockTransport(fake_mlflow)), "adult-income")
    status, text, job = cancel_outputs(actions, str(JOB["id"]))
    assert status == f"Job `{JOB['id']}` is **cancelled**." and job["state"] == "cancelled"
    assert "**cancelled**" in text and "Started by key ui-20260101000000 (id 3fa2c1d0e9b8)" in text
    assert "| cancelled | 0 | key ui-20260101000000 (id 3fa2c1d0e9b8) | cancelled |" in text
    assert not follow(job).active
    status, text, job = cancel_outputs(actions, str(FINISHED["id"]))
    assert status == f"**Error:** The job has already ended (409): job {FINISHED['id']} has already ended: succeeded"
    assert job["state"] == "succeeded" and "**succeeded**" in text  # as it ended
    status, text, job = cancel_outputs(actions, "nope")
    assert status == "**Error:** Not found (404): no training job 'nope'"
    assert text == job == gr.skip()


def test_the_job_limit_says_when_to_try_again(client):
    _, text, job = client.predict("train", "busy", "{}", api_name="/start_job")
    assert job["error"] == (
        "Job limit reached (429): this key has 2 jobs queued or running, its limit; try again in 30 s"
    )
    assert text == f"**Error:** {job['error']}"


@pytest.fixture(scope="module")
def predict_only() -> Iterator[Client]:
    for url in _serve(PREDICT_KEY):
        yield Client(url, auth=("u", "p"), verbose=False)


def test_a_key_without_a_scope_loses_only_that_part(predict_only):
    # Predictions work as ever.
    view = predict_only.predict({"age": 39, "sex": "Male"}, api_name="/predict")
    assert view["request_id"] == "rid1"
    assert predict_only.predict(api_name="/form_schema")["model"] == "adult-income v3"
    grant = (
        "an operator can grant it with `python -m cluster keys add <name> --scopes predict,feedback,train` "
        "and set UI_API_KEY to the new key"
    )
    _, text, job = predict_only.predict("train", "", "{}", api_name="/start_job")
    assert job["error"].startswith(
        f"This UI's API key lacks the 'train' scope, so training jobs cannot be started here; {grant}"
    )
    assert job["error"].endswith("[request id rid-403]")
    assert text == f"**Not available with this key:** {job['error']}"
    table, status = predict_only.predict(api_name="/recent_jobs")
    assert table["data"] == []
    assert status.startswith(
        "**Not available with this key:** This UI's API key lacks the 'train' scope, so training jobs cannot be "
        "listed here"
    )
    refused = predict_only.predict(JOB["id"], api_name="/cancel_job")["error"]
    assert refused.startswith("This UI's API key lacks the 'train' scope, so training jobs cannot be cancelled here")
    refused = predict_only.predict("rid1", "<=50K", api_name="/feedback")["error"]
    assert refused.startswith("This UI's API key lacks the 'feedback' scope, so feedback cannot be sent from here")


def test_root_url_follows_the_proxy_s_prefix(ui_url):
    def root(headers: dict[str, str]) -> str:
        match = re.search(r'"root":\s*"([^"]*)"', httpx.get(f"{ui_url}/", headers=headers).text)
        assert match is not None
        return match.group(1)

    assert root({}) == ui_url  # reached directly
    # Through Nginx, which strips /ui/ and names it in X-Forwarded-Prefix.
    proxied = {"X-Forwarded-Host": "edge.example:8443", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/ui"}
    assert root(proxied) == "https://edge.example:8443/ui"


def test_a_ui_without_a_key_says_so():
    for url in _serve(None):
        client = Client(url, auth=("u", "p"), verbose=False)
        assert "no API key" in client.predict({"age": 1}, api_name="/predict")["error"]
