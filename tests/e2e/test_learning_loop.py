"""The loop learning on the running stack: a served model meets traffic whose inputs and label
relation have shifted. Drift and estimated accuracy move and the drift alert fires before any label
is sent; labels then arrive for part of the traffic; the job the alert queued trains on them, is
promoted because it is better on the recent held-out slice, and live accuracy on the shifted
traffic rises. A rejected candidate fails this test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import psycopg
import pytest
import yaml
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack
from services.training_jobs.models import CONFIG_DIR
from tests.conftest import label_free_rules, train_job
from tests.stack_probes import firing_alerts, until
from tests.training_jobs_helpers import wait_job

BATCH = 50  # MAX_BATCH_ROWS of the test stack


def _rows(rng: np.random.Generator, n: int, shifted: bool) -> pd.DataFrame:
    """Before the shift: the label follows x1 + x2 / 2. After it: customers the model has rarely seen
    (x3 at the edge of its training range, mostly one channel, x1 and x2 close to the old decision
    boundary, where the model is unsure) whose label follows x3 instead."""
    if shifted:
        x1, x2, x3 = rng.normal(0.0, 0.1, n), rng.normal(0.0, 0.2, n), rng.normal(2.5, 0.4, n)
        channel = np.where(rng.random(n) < 0.9, "store", "web")
        z = 12.0 * (x3 - 2.5)
    else:
        x1, x2, x3 = rng.normal(0.0, 1.0, n), rng.normal(0.0, 1.0, n), rng.normal(0.0, 1.0, n)
        channel = rng.choice(["web", "store"], n)
        z = 6.0 * (x1 + x2 / 2)
    label = np.where(rng.random(n) < 1 / (1 + np.exp(-z)), "yes", "no")
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "channel": channel, "converted": label})


def _predict(stack: Stack, model: str, frame: pd.DataFrame) -> list[tuple[str, int, str, str]]:
    """(request id, index, predicted label, version) of every row, sent in batches."""
    out: list[tuple[str, int, str, str]] = []
    features = frame.drop(columns=["converted"]).to_dict("records")
    for start in range(0, len(features), BATCH):
        body = {"instances": features[start : start + BATCH]}
        response = stack.http.post(f"/v1/models/{model}/predict", json=body, headers=stack.auth)
        assert response.status_code == 200, response.text
        answer = response.json()
        version = str(answer["model"]["version"])
        out += [(answer["request_id"], i, p["label"], version) for i, p in enumerate(answer["predictions"])]
    return out


def _accuracy(predicted: list[tuple[str, int, str, str]], frame: pd.DataFrame) -> float:
    labels = frame["converted"].tolist()
    return float(np.mean([p[2] == y for p, y in zip(predicted, labels, strict=True)]))


def _monitoring(stack: Stack, model: str) -> dict[str, Any]:
    response = stack.http.get(f"/v1/models/{model}/monitoring", headers=stack.auth)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _judged(stack: Stack, model: str, version: str, after: str | None, ok: Any) -> dict[str, Any]:
    """The first monitoring report for `version` computed after `after` that satisfies `ok`."""

    def probe() -> dict[str, Any] | None:
        report = _monitoring(stack, model)
        fresh = report["computed_at"] is not None and (after is None or report["computed_at"] > after)
        return report if report["version"] == version and report["status"] == "ok" and fresh and ok(report) else None

    found: dict[str, Any] = until(f"a monitoring report of {model} v{version}", probe, 120)
    return found


@pytest.fixture
def shipped_config(stack: Stack, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A task's config where the alert's retraining looks for it (jobs/configs), trained on data
    from before the shift; removed afterwards with the predictions and labels it drew."""
    name = f"loop-e2e-{uuid.uuid4().hex[:8]}"
    data = tmp_path / "before.csv"
    _rows(np.random.default_rng(5), 2000, shifted=False).to_csv(data, index=False)
    config = {
        "name": name,
        "task": "classification",
        "data": {"train_uri": str(data), "target": "converted"},
        "model": {"hidden": [64, 32]},
        # Small batches: the retraining job runs the test stack's RETRAIN_OVERRIDES epochs only.
        "train": {"num_workers": 1, "epochs": 15, "patience": 4, "batch_size": 32, "lr": 0.01},
        # The job waits for this many labels of the drifted version before it exports them.
        "feedback": {"min_rows": 1500},
    }
    path = CONFIG_DIR / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    try:
        yield name, str(path)
    finally:
        path.unlink(missing_ok=True)
        # An alert that fired after the loop's job ended queued another: it would hold the
        # dispatcher and the cores for the tests after this one.
        listed = stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth).json()["jobs"]
        for job in listed:
            if job["config"] == name and job["state"] in {"queued", "submitted", "running"}:
                stack.http.delete(f"/v1/training-jobs/{job['id']}", headers=stack.auth)
        dsn = stack.settings.database.value()
        assert dsn is not None
        with psycopg.connect(dsn) as conn:
            conn.execute("DELETE FROM predictions WHERE model_name = %s", (name,))


@pytest.fixture
def label_free_alerts_for(stack: Stack) -> Iterator[Any]:
    """The shipped ModelDataDrift rule, for one model only (the other tests' traffic of repeated
    example rows drifts by design), loaded into the stack's Prometheus."""
    rules_dir = Path(stack.settings.prometheus.rules_dir)
    written: list[Path] = []

    def load(model: str) -> None:
        rules = label_free_rules(model, ["ModelDataDrift"], for_s=3)
        path = rules_dir / f"label-free-{model}.yml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
        written.append(path)
        assert httpx.post(f"{stack.settings.prometheus.url}/-/reload", timeout=10).status_code == 200

    yield load
    for path in written:
        path.unlink(missing_ok=True)
    httpx.post(f"{stack.settings.prometheus.url}/-/reload", timeout=10)


def test_drift_alerts_before_labels_and_the_retrain_on_feedback_is_promoted(
    stack, shipped_config, label_free_alerts_for, figures
):
    name, path = shipped_config
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    first = train_job(stack, path)
    assert first["model_name"] == name and first["promotion"]["promote"], first
    v1 = str(first["model_version"])
    tags = client.get_model_version(name, v1).tags
    run = client.get_run(str(client.get_model_version(name, v1).run_id))
    assert run.data.metrics["val_ece_after"] <= run.data.metrics["val_ece_before"] + 1e-9
    until(f"{name} v{v1} served", lambda: _served_version(stack, name) == v1, 120)
    label_free_alerts_for(name)
    rng = np.random.default_rng(17)

    # 1. Traffic like the training data: no drift, estimated accuracy close to the reference.
    before = _rows(rng, 400, shifted=False)
    before_accuracy = _accuracy(_predict(stack, name, before), before)
    calm = _judged(stack, name, v1, None, lambda r: r["window_rows"] >= stack.settings.monitor.max_rows)
    assert not calm["dataset_drift"], calm
    assert calm["drift_share"] < stack.settings.monitor.drift_share_threshold
    assert abs(calm["estimated_accuracy"] - calm["reference_accuracy"]) < 0.08, calm
    assert not firing_alerts(stack, "ModelDataDrift", model=name)

    # 2. The shift, with no label sent: drift and the estimate move, the drift alert fires and
    # its webhook queues a retraining job that names the alert and its figures.
    shifted = _rows(rng, 2000, shifted=True)
    predicted = _predict(stack, name, shifted)
    shifted_accuracy = _accuracy(predicted, shifted)
    drifted = _judged(stack, name, v1, calm["computed_at"], lambda r: r["dataset_drift"])
    by_feature = {f["name"]: f for f in drifted["features"]}
    assert by_feature["x3"]["drifted"] and by_feature["channel"]["drifted"] and by_feature["x1"]["drifted"], by_feature
    assert drifted["prediction"] is not None
    assert drifted["estimated_accuracy"] < calm["estimated_accuracy"] - 0.05, (calm, drifted)
    fired = until("ModelDataDrift firing", lambda: firing_alerts(stack, "ModelDataDrift", model=name), 120)
    assert fired[0]["labels"]["action"] == "retrain" and fired[0]["labels"]["model_version"] == v1
    job = until("the drift alert's retraining job", lambda: _alert_job(stack, name, "ModelDataDrift"), 120)
    assert job["overrides"].get("feedback.enabled") is True
    assert job["reason"].startswith("ModelDataDrift") and name in job["reason"]
    assert job["events"][0]["message"].startswith("accepted: ModelDataDrift")
    assert _labels_given(stack, name) == 0

    # 3. Labels arrive for part of the shifted traffic; the job trains on them.
    labelled = int(len(predicted) * 0.85)
    for (request_id, index, _, _), truth in zip(predicted[:labelled], shifted["converted"][:labelled], strict=True):
        body = {"request_id": request_id, "index": index, "label": truth}
        response = stack.http.post("/v1/feedback", json=body, headers=stack.auth)
        assert response.status_code == 201, response.text
    done = wait_job(stack, job["id"], {"succeeded"}, 900)
    assert done["promoted"] is True, done
    v2 = str(done["model_version"])
    decision = client.get_model_version(name, v2).tags
    assert decision["promotion.decision"] == "promoted", decision
    recent_candidate = float(decision["promotion.recent_candidate_score"])
    recent_champion = float(decision["promotion.recent_champion_score"])
    assert recent_candidate > recent_champion
    run2 = client.get_run(str(client.get_model_version(name, v2).run_id))
    assert int(run2.data.params["data.feedback_rows"]) >= stack_feedback_floor(labelled)
    assert run2.inputs is not None
    contexts = [{t.value for t in i.tags} for i in run2.inputs.dataset_inputs]
    assert any("feedback" in c for c in contexts), contexts

    # 4. The new champion answers the shifted traffic better.
    until(f"{name} v{v2} served", lambda: _served_version(stack, name) == v2, 120)
    fresh = _rows(rng, 400, shifted=True)
    after_accuracy = _accuracy(_predict(stack, name, fresh), fresh)
    assert after_accuracy >= 0.75 and after_accuracy > shifted_accuracy + 0.2, (shifted_accuracy, after_accuracy)
    ece = {k: run.data.metrics[f"val_ece_{k}"] for k in ("before", "after")}
    figures["learning_loop"] = {
        "versions": {"before": v1, "after": v2},
        "calibration_ece": ece,
        "drift_share": {"before_shift": calm["drift_share"], "after_shift": drifted["drift_share"]},
        "estimated_accuracy": {
            "before_shift": calm["estimated_accuracy"],
            "after_shift": drifted["estimated_accuracy"],
        },
        "reference_accuracy": calm["reference_accuracy"],
        "measured_accuracy": {
            "before_shift": before_accuracy,
            "after_shift": shifted_accuracy,
            "after": after_accuracy,
        },
        "gate": {k: v for k, v in decision.items() if k.startswith("promotion.")},
        "reason": job["reason"],
        "version_tags": {k: v for k, v in tags.items() if k.startswith("audit.")},
    }


def stack_feedback_floor(labelled: int) -> int:
    """The job exports once the config's minimum is there; labels still arriving may join."""
    return min(labelled, 1500)


def _served_version(stack: Stack, model: str) -> str | None:
    response = stack.http.get(f"/v1/models/{model}", headers=stack.auth)
    if response.status_code != 200:
        return None
    version = response.json().get("version")
    return str(version) if version else None


def _alert_job(stack: Stack, config: str, alert: str) -> dict[str, Any] | None:
    listed = stack.http.get("/v1/training-jobs", params={"limit": 200}, headers=stack.auth).json()["jobs"]
    found = [j for j in listed if j["config"] == config and (j["idempotency_key"] or "").startswith(f"alert:{alert}:")]
    if not found:
        return None
    detail = stack.http.get(f"/v1/training-jobs/{found[0]['id']}", headers=stack.auth)
    assert detail.status_code == 200, detail.text
    job: dict[str, Any] = detail.json()
    return job


def _labels_given(stack: Stack, model: str) -> int:
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM feedback WHERE model_name = %s", (model,)).fetchone()
    return int(row[0]) if row else 0
