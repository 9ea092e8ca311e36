"""Hyperparameter search through the Ray Jobs API: Ray Tune + Ray Train, tracked in MLflow, with
ASHA stopping a trial early in a run built so that it must.

Two trials run one after the other, a good learning rate first and a useless one second. With a
grace period of one epoch and a reduction factor of two, the second trial reaches the first rung
with only the first trial's result recorded there; being worse, it is below the rung's median and
ASHA stops it after its first epoch, while the first trial trains all its epochs.
"""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack
from jobs.result import training_result
from services.ray_submission import follow_job, submit_training

CONFIG = "jobs/configs/adult-tune.yaml"
# Its own registered model: the Serve app and the other tests follow `adult-income`'s champion.
MODEL = "adult-income-tuned"
EPOCHS = 4
# As written in the overrides (YAML reads "1e-06" as a string, "0.000001" as a number).
GOOD_LR = "0.004"
# Two thousand times below the shipped rate: one epoch leaves the model close to where it started.
USELESS_LR = "0.000001"
OVERRIDES = [
    f"model_name={MODEL}",
    f"train.epochs={EPOCHS}",
    # The trials' own early stopping never ends a trial within its epochs: only ASHA may.
    f"train.patience={EPOCHS}",
    "tune.num_samples=2",
    # One at a time, in the order given: the good trial has reached every rung before the other starts.
    "tune.max_concurrent_trials=1",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
    f"tune.search_space={{train.lr: {{choice: [{GOOD_LR}, {USELESS_LR}]}}}}",
    f"tune.points_to_evaluate=[{{train.lr: {GOOD_LR}}}, {{train.lr: {USELESS_LR}}}]",
]


@pytest.fixture(scope="module")
def tuned(stack: Stack) -> dict[str, Any]:
    """One tuning job's result line, its MLflow run and its trials' runs."""
    job_id = submit_training(stack.settings, CONFIG, OVERRIDES, module="jobs.tune")
    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert sum(line.startswith("TRAINING_RESULT ") for line in logs.splitlines()) == 1
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    parent = client.get_run(result["run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    return {"result": result, "client": client, "parent": parent, "children": children}


def epochs_run(client: MlflowClient, run: Run) -> int:
    """Epochs the trial trained, from the per-epoch validation loss its rank-0 worker logged."""
    return len(client.get_metric_history(run.info.run_id, "val_loss"))


def test_tune_job_tracks_trials_and_registers_the_best(tuned):
    result, client, parent, children = tuned["result"], tuned["client"], tuned["parent"], tuned["children"]
    assert result["trials"] == 2 and result["model_name"] == MODEL
    assert 1 <= result["epochs_run"] <= EPOCHS
    assert result["test_metrics"]["roc_auc"] > 0.85
    assert result["best_params"] == {"train.lr": float(GOOD_LR)}

    assert parent.info.status == "FINISHED"
    assert parent.data.tags["job.kind"] == "tune" and parent.data.tags["data.sha256"]
    assert parent.data.metrics["test_roc_auc"] == result["test_metrics"]["roc_auc"]
    assert float(parent.data.params["best_trial.train.lr"]) == float(GOOD_LR)

    assert len(children) == 2
    for child in children:
        # A trial that ASHA stopped is closed by the driver; none may stay RUNNING.
        assert child.info.status == "FINISHED", child.data.tags
        assert child.data.tags["tune.trial_id"]
        assert child.data.params["train.num_workers"] == "1"  # tune.trial_workers
        assert client.get_metric_history(child.info.run_id, "val_loss")  # per epoch, from rank 0
    assert result["best_run_id"] in {c.info.run_id for c in children}

    # The version's run is the trial that produced it, a child of the tune run.
    version = client.get_model_version(MODEL, str(result["model_version"]))
    assert version.run_id == result["best_run_id"]
    best = client.get_run(result["best_run_id"])
    assert best.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert best.data.metrics["test_roc_auc"] == result["test_metrics"]["roc_auc"]

    # A new model name has no champion yet: the gate promotes and records why.
    assert result["promotion"]["promote"] is True and result["promotion"]["metric"] == "roc_auc"
    assert client.get_model_version_by_alias(MODEL, "champion").version == version.version
    assert version.tags["promotion.decision"] == "promoted"


def test_asha_stops_the_clearly_worse_trial_early(tuned):
    result, client, children = tuned["result"], tuned["client"], tuned["children"]
    by_lr = {float(child.data.params["train.lr"]): child for child in children}
    assert sorted(by_lr) == sorted([float(GOOD_LR), float(USELESS_LR)]), [c.data.params for c in children]
    good, useless = by_lr[float(GOOD_LR)], by_lr[float(USELESS_LR)]

    # Stopped by the scheduler, not failed: the driver closes a trial Tune stopped without an error
    # as FINISHED and early-stopped, and a crashed one as FAILED with its error.
    assert useless.info.status == "FINISHED", useless.data.tags
    assert useless.data.tags["tune.early_stopped"] == "true", useless.data.tags
    assert "tune.error" not in useless.data.tags
    assert 1 <= epochs_run(client, useless) < EPOCHS

    assert good.data.tags["tune.early_stopped"] == "false", good.data.tags
    assert epochs_run(client, good) == EPOCHS
    assert result["best_run_id"] == good.info.run_id
