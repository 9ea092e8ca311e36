"""A training request with `feedback.enabled` on the real stack: the dispatcher exports the
model's labelled predictions before submitting it, says so in the job's history, and the Ray job
trains on them and logs them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from cluster.demo import wait_for_version
from serve_apps.schemas import EXAMPLE_ROW
from tests.training_jobs_helpers import QUICK, post_job, wait_job

LABELLED = 60
# The learning-loop e2e test crosses the same path on every run (tests/e2e/test_learning_loop.py);
# this one, on the default model, runs with `make test-extended`.
pytestmark = [pytest.mark.integration, pytest.mark.extended]


def _predict_and_label(stack: Any, rows: int) -> None:
    """`rows` served predictions of the champion, each given a true label (both classes)."""
    batch = stack.settings.max_batch_rows
    given = 0
    while given < rows:
        count = min(batch, rows - given)
        instances = [{**EXAMPLE_ROW, "age": 20 + (given + i) % 50} for i in range(count)]
        response = stack.http.post("/v1/predict", json={"instances": instances}, headers=stack.auth)
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]
        for index in range(count):
            label = ">50K" if (given + index) % 2 else "<=50K"
            body = {"request_id": request_id, "index": index, "label": label}
            sent = stack.http.post("/v1/feedback", json=body, headers=stack.auth)
            assert sent.status_code == 201, sent.text
        given += count


def test_a_job_with_feedback_trains_on_a_snapshot_of_the_labelled_predictions(stack, trained):
    assert wait_for_version(stack.settings, str(trained["model_version"]), 60)
    _predict_and_label(stack, LABELLED)
    # Promotion off: this test's version must not replace the session's champion.
    overrides = {**QUICK, "feedback.enabled": True, "promotion.enabled": False}
    response = post_job(stack, {"kind": "train", "config": "adult", "overrides": overrides})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    done = wait_job(stack, job_id, {"succeeded"}, 900)

    snapshot = Path(stack.settings.state_dir).resolve() / "feedback" / "adult-income" / f"{job_id}.parquet"
    assert snapshot.is_file()
    noted = [e for e in done["events"] if (e["message"] or "").startswith("feedback snapshot ")]
    assert len(noted) == 1 and noted[0]["state"] == "submitted" and noted[0]["attempt"] == 1
    assert f"feedback snapshot {snapshot}: " in noted[0]["message"] and "labelled rows" in noted[0]["message"]
    rows = int(noted[0]["message"].split(": ")[1].split()[0])
    assert rows >= LABELLED
    # The job's own overrides are the requester's; the snapshot travelled with its submission.
    assert "data.feedback_uri" not in done["overrides"]

    run = MlflowClient(stack.settings.mlflow.tracking_uri).get_run(done["mlflow_run_id"])
    params = run.data.params
    assert params["data.feedback_uri"] == str(snapshot) and len(params["data.feedback_sha256"]) == 64
    assert int(params["data.feedback_rows"]) == rows
    recent = int(params["data.feedback_recent_rows"])
    assert recent == round(rows * 0.3) and int(params["data.feedback_train_rows"]) == rows - recent
    assert run.data.tags["data.sha256.feedback"] == params["data.feedback_sha256"]
    assert run.inputs is not None
    contexts = {t.value for i in run.inputs.dataset_inputs for t in i.tags if t.key == "mlflow.data.context"}
    assert "feedback" in contexts
