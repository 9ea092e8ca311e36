"""A training worker killed mid-run: Ray Train restarts the group from the last checkpoint."""

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

from core.health import wait_until
from jobs.result import training_result
from services.ray_submission import follow_job, jobs_client, submit_training
from tests.stack_probes import train_worker_pids

# CI checks resuming from a checkpoint with the harder fault, the whole node lost
# (test_node_failure.py); this one runs in `make test-reliability` and `make test-extended`.
pytestmark = pytest.mark.extended

EPOCHS = 6


def test_killed_worker_resumes_from_checkpoint(stack, trained):
    overrides = [f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}", "promotion.enabled=false"]
    job_id = submit_training(stack.settings, "jobs/configs/adult.yaml", overrides)
    jobs = jobs_client(stack.settings)
    assert wait_until(lambda: "Reporting training result 2:" in jobs.get_job_logs(job_id), 300, max_wait_s=1)
    workers = train_worker_pids(stack.settings)
    assert workers, "no Ray Train worker process found"
    os.kill(workers[0], signal.SIGKILL)

    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    result = training_result(logs)
    assert result is not None and result["epochs_run"] == EPOCHS

    history = MlflowClient(stack.settings.mlflow.tracking_uri).get_metric_history(result["run_id"], "val_loss")
    steps = sorted(m.step for m in history)
    assert steps[-1] == EPOCHS - 1
    # Resumed, not restarted: at most the epoch in flight at the kill is logged twice.
    assert set(steps) == set(range(EPOCHS)) and len(steps) <= EPOCHS + 1, steps
