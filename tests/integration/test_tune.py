"""Hyperparameter search through the Ray Jobs API: Ray Tune + Ray Train, tracked in MLflow."""

import json

from mlflow.tracking import MlflowClient

from jobs.config import load_config
from jobs.result import training_result
from services.ray_submission import follow_job, submit_training

CONFIG = "jobs/configs/adult-tune.yaml"

# Its own registered model: the Serve app and the other tests follow `adult-income`'s champion.
MODEL = "adult-income-tuned"
OVERRIDES = [
    f"model_name={MODEL}",
    "tune.num_samples=2",
    "train.epochs=2",
    "tune.grace_period=1",
    "tune.reduction_factor=2",
]


def test_tune_job_tracks_trials_and_registers_the_best(stack):
    job_id = submit_training(stack.settings, CONFIG, OVERRIDES, module="jobs.tune")
    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    assert sum(line.startswith("TRAINING_RESULT ") for line in logs.splitlines()) == 1
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    assert result["trials"] == 2 and result["model_name"] == MODEL
    assert 1 <= result["epochs_run"] <= 2
    assert result["test_metrics"]["roc_auc"] > 0.85
    tune = load_config(CONFIG).tune
    assert tune is not None and set(result["best_params"]) == set(tune.search_space)

    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    parent = client.get_run(result["run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["job.kind"] == "tune" and parent.data.tags["data.sha256"]
    assert parent.data.metrics["test_roc_auc"] == result["test_metrics"]["roc_auc"]
    assert parent.data.params["best_trial.model.hidden"] == json.dumps(result["best_params"]["model.hidden"])

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
    )
    assert len(children) == 2
    for child in children:
        # A trial that ASHA stopped is closed by the driver; none may stay RUNNING.
        assert child.info.status == "FINISHED", child.data.tags
        assert child.data.tags["tune.early_stopped"] in {"true", "false"}
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
