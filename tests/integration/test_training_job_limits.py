"""What a key with the `train` scope (and not `admin`) may start, see and cancel over HTTP, through
Nginx: requests that must not run are refused before anything is stored, the key's job limit is
a 429 with Retry-After and queues nothing, and `DELETE /v1/training-jobs/{id}` cancels its own
jobs only."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cluster.sandbox import Stack
from tests.training_jobs_helpers import QUICK, add_key, wait_job

pytestmark = pytest.mark.integration

# Nothing these jobs train may become a champion: other tests rely on the one they trained.
NO_PROMOTION = {**QUICK, "promotion.enabled": False}


@pytest.fixture(scope="module")
def trainer(stack: Stack) -> dict[str, str]:
    return add_key(stack, "limits-train", "train")


def post(stack: Stack, headers: dict[str, str], body: dict[str, Any]) -> httpx.Response:
    return stack.http.post("/v1/training-jobs", json=body, headers=headers, timeout=30)


def job_count(stack: Stack) -> int:
    response = stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth, timeout=30)
    assert response.status_code == 200, response.text
    return len(response.json()["jobs"])


@pytest.mark.parametrize(
    ("overrides", "field", "words"),
    [
        ({"data.train_uri": "/etc/passwd"}, "data.train_uri", "data/"),
        ({"data.test_uri": "file:///etc/passwd"}, "data.test_uri", "data/"),
        ({"model_name": "other"}, "model_name", "operator"),
        ({"promotion.margin": -1}, "promotion.margin", "operator"),
        ({"train.num_workers": 64}, "train.num_workers", "64"),
        ({"train.epochs": 100000}, "train.epochs", "100000"),
    ],
)
def test_requests_that_must_not_run_are_refused_before_anything_is_stored(
    stack: Stack, trainer: dict[str, str], overrides: dict[str, Any], field: str, words: str
) -> None:
    before = job_count(stack)
    response = post(stack, trainer, {"overrides": overrides})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["details"][0]["loc"] == ["body", "overrides", field], error
    assert words in error["message"], error
    assert job_count(stack) == before, "a refused request was stored"


def test_an_admin_cannot_ask_for_more_than_the_cluster_has(stack: Stack) -> None:
    """Admins skip the caps, never the cluster's size: a job that can never be placed is refused."""
    response = post(stack, stack.auth, {"overrides": {**NO_PROMOTION, "train.num_workers": 10_000}})
    assert response.status_code == 422, response.text
    assert "CPU" in response.json()["error"]["message"]


def test_the_job_limit_is_a_429_that_queues_nothing_and_cancel_frees_it(stack: Stack, trainer: dict[str, str]) -> None:
    limit = stack.settings.training.max_active_per_key
    started = []
    for _ in range(limit):
        accepted = post(stack, trainer, {"overrides": NO_PROMOTION})
        assert accepted.status_code == 202, accepted.text
        started.append(accepted.json()["id"])
    before = job_count(stack)
    refused = post(stack, trainer, {"overrides": NO_PROMOTION})
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["Retry-After"]) >= 1
    error = refused.json()["error"]
    assert error["code"] == "job_limit_exceeded" and error["details"][0]["ctx"]["limit"] == "active"
    assert job_count(stack) == before, "a refused request was stored"

    for job_id in started:
        cancelled = stack.http.delete(f"/v1/training-jobs/{job_id}", headers=trainer, timeout=30)
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    again = post(stack, trainer, {"overrides": NO_PROMOTION})
    assert again.status_code == 202, f"cancelled jobs still count against the key: {again.text}"
    assert stack.http.delete(f"/v1/training-jobs/{again.json()['id']}", headers=trainer, timeout=30).status_code == 200


def test_a_key_sees_and_cancels_only_its_own_jobs(stack: Stack, trainer: dict[str, str]) -> None:
    other = add_key(stack, "limits-other", "train")
    mine = post(stack, trainer, {"overrides": NO_PROMOTION})
    assert mine.status_code == 202, mine.text
    job_id = mine.json()["id"]
    path = f"/v1/training-jobs/{job_id}"

    # Another key: as if the job did not exist, and nothing changes.
    assert stack.http.get(path, headers=other, timeout=30).status_code == 404
    assert stack.http.delete(path, headers=other, timeout=30).status_code == 404
    listed = stack.http.get("/v1/training-jobs", headers=other, timeout=30).json()["jobs"]
    assert job_id not in {job["id"] for job in listed}
    assert stack.http.get(path, headers=trainer, timeout=30).json()["state"] != "cancelled"

    cancelled = stack.http.delete(path, headers=trainer, timeout=30)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled", cancelled.text
    assert stack.http.delete(path, headers=trainer, timeout=30).json()["state"] == "cancelled", "not idempotent"
    detail = stack.http.get(path, headers=stack.auth, timeout=30).json()  # an admin sees every job
    creator = detail["created_by"]
    assert creator["kind"] == "api_key" and creator["name"].startswith("limits-train-")
    cancel_events = [e for e in detail["events"] if e["state"] == "cancelled"]
    assert len(cancel_events) == 1 and cancel_events[0]["actor"]["key_id"] == creator["key_id"]
    assert "Bearer" not in str(detail), "a key was recorded"
    # The dispatcher leaves it cancelled: no later state overwrites the cancel.
    assert wait_job(stack, job_id, {"cancelled"}, timeout_s=60)["state"] == "cancelled"
