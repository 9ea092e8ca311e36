"""Feedback over real HTTP into PostgreSQL, and the alert webhook's authentication."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import psycopg
import pytest

from cluster.demo import wait_for_version
from cluster.sandbox import temporary_database
from serve_apps.schemas import EXAMPLE_ROW
from services.feedback.store import FeedbackOutcome, FeedbackStore, PredictionRow
from tests.conftest import ALERT_WEBHOOK_TOKEN


@pytest.fixture(scope="module")
def api(stack, trained):
    assert wait_for_version(stack.settings, str(trained["model_version"]), 60)
    with httpx.Client(base_url=stack.api_url, verify=stack.verify, timeout=30) as client:
        yield client


def _predict(api: httpx.Client, auth: dict[str, str], rows: int = 2) -> dict[str, Any]:
    response = api.post("/v1/predict", json={"instances": [EXAMPLE_ROW] * rows}, headers=auth)
    assert response.status_code == 200, response.text
    return response.json()


def _other(label: str) -> str:
    return ">50K" if label == "<=50K" else "<=50K"


def test_feedback_is_recorded_once_and_stored(api, stack):
    predicted = _predict(api, stack.auth)
    rid, label = predicted["request_id"], predicted["predictions"][1]["label"]
    first = api.post("/v1/feedback", json={"request_id": rid, "index": 1, "label": _other(label)}, headers=stack.auth)
    assert first.status_code == 201, first.text
    body = first.json()
    assert body["outcome"] == "recorded" and body["correct"] is False and body["predicted"] == label
    assert body["model"]["version"] == predicted["model"]["version"]
    # A repeat, even with another label, changes nothing: the first label stays.
    again = api.post("/v1/feedback", json={"request_id": rid, "index": 1, "label": label}, headers=stack.auth)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert again.json()["label"] == _other(label)
    dsn = stack.settings.database.url.get_secret_value()
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT p.row_index, p.label, f.label, f.correct FROM predictions p "
            "LEFT JOIN feedback f USING (request_id, row_index) WHERE p.request_id = %s ORDER BY 1",
            (rid,),
        ).fetchall()
    assert rows == [(0, predicted["predictions"][0]["label"], None, None), (1, label, _other(label), False)]


def test_feedback_for_a_row_the_response_had_counts_right_away(api, stack):
    # The prediction may still be in the write buffer: feedback must find it anyway.
    for _ in range(5):
        predicted = _predict(api, stack.auth, rows=1)
        label = predicted["predictions"][0]["label"]
        response = api.post(
            "/v1/feedback", json={"request_id": predicted["request_id"], "label": label}, headers=stack.auth
        )
        assert response.status_code == 201, response.text
        assert response.json()["correct"] is True


@pytest.mark.parametrize(
    "body, status, code",
    [
        ({"request_id": "no-such-request", "index": 0, "label": ">50K"}, 404, "not_found"),
        ({"request_id": "x", "index": -1, "label": ">50K"}, 422, "validation_error"),
        ({"request_id": "", "label": ">50K"}, 422, "validation_error"),
        ({"request_id": "x", "label": ">50K", "extra": 1}, 422, "validation_error"),
    ],
)
def test_bad_feedback_gets_a_clear_error(api, stack, body, status, code):
    response = api.post("/v1/feedback", json=body, headers=stack.auth)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


def test_feedback_with_an_unknown_label_or_index_is_refused(api, stack):
    rid = _predict(api, stack.auth, rows=1)["request_id"]
    wrong = api.post("/v1/feedback", json={"request_id": rid, "label": "rich"}, headers=stack.auth)
    assert wrong.status_code == 422 and wrong.json()["error"]["details"][0]["loc"] == ["body", "label"]
    assert (
        api.post("/v1/feedback", json={"request_id": rid, "index": 5, "label": ">50K"}, headers=stack.auth).status_code
        == 404
    )
    assert api.post("/v1/feedback", json={"request_id": rid, "label": ">50K"}).status_code == 401


def test_alert_webhook_takes_only_its_own_token(api, stack):
    payload = {"status": "firing", "alerts": []}
    assert api.post("/v1/alerts/alertmanager", json=payload).status_code == 401
    assert api.post("/v1/alerts/alertmanager", json=payload, headers=stack.auth).status_code == 401
    token = {"Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"}
    ok = api.post("/v1/alerts/alertmanager", json=payload, headers=token)
    assert ok.status_code == 200 and ok.json() == {"retrain": [], "refused": []}
    # Alerts without the retrain action (a component down) start nothing.
    down = {
        "status": "firing",
        "alerts": [{"status": "firing", "labels": {"alertname": "ComponentDown"}, "startsAt": "2026-01-01T00:00:00Z",
                    "fingerprint": "abc"}],
    }  # fmt: skip
    assert api.post("/v1/alerts/alertmanager", json=down, headers=token).json() == {"retrain": [], "refused": []}
    assert api.post("/v1/alerts/alertmanager", json={"alerts": "x"}, headers=token).status_code == 422


def test_store_refuses_feedback_for_expired_predictions():
    async def scenario(dsn: str) -> list[FeedbackOutcome]:
        store = FeedbackStore(dsn)
        await store.open()
        try:
            await store.migrate()
            await store.migrate()  # idempotent
            await store.record_predictions([PredictionRow("r", 0, "m", "1", "a", 0.9, {"x": 1})])
            # The same request id again keeps the first prediction.
            await store.record_predictions([PredictionRow("r", 0, "m", "2", "b", 0.8, {"x": 2})])
            time.sleep(0.05)
            expired = await store.add_feedback("r", 0, "b", max_age_s=0.01)
            recorded = await store.add_feedback("r", 0, "b", max_age_s=3600)
            rows = await store.labelled_rows(None, 10)
            assert rows[0][0] == {"x": 1} and rows[0][1] == "b"
            accuracy = await store.live_accuracy(3600)
            assert [(a.model_version, a.feedback, a.correct) for a in accuracy] == [("1", 1, 0)]
            return [expired.outcome, recorded.outcome]
        finally:
            await store.close()

    with temporary_database("feedback_test") as name:
        outcomes = asyncio.run(scenario(f"postgresql://postgres@127.0.0.1:5432/{name}"))
    assert outcomes == [FeedbackOutcome.EXPIRED, FeedbackOutcome.RECORDED]


def _retrain_alert(fingerprint: str, **labels: str) -> dict[str, Any]:
    alert = {"alertname": "ModelAccuracyLow", "action": "retrain", **labels}
    return {"status": "firing", "labels": alert, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": fingerprint}


def test_a_retrain_alert_no_config_can_serve_queues_nothing_and_says_why(api, stack):
    """The job an alert queues trains the alert's model: for a model no shipped config trains, or an
    alert without a model, there is no safe job, and nothing is queued."""
    token = {"Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"}
    before = api.get("/v1/training-jobs", params={"limit": 100}, headers=stack.auth).json()["jobs"]
    payload = {
        "status": "firing",
        "alerts": [_retrain_alert("f1", model="credit-scoring", model_version="3"), _retrain_alert("f2")],
    }
    response = api.post("/v1/alerts/alertmanager", json=payload, headers=token)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["retrain"] == []
    assert [(r["fingerprint"], r["model"]) for r in body["refused"]] == [("f1", "credit-scoring"), ("f2", None)]
    assert "no config in jobs/configs trains 'credit-scoring'" in body["refused"][0]["reason"]
    assert "no 'model' label" in body["refused"][1]["reason"]
    after = api.get("/v1/training-jobs", params={"limit": 100}, headers=stack.auth).json()["jobs"]
    assert [job["id"] for job in after] == [job["id"] for job in before]
