"""A training worker killed mid-run: Ray Train restarts the group from the last checkpoint."""

import pytest

from jobs.result import training_result
from services.ray_submission import follow_job, submit_training
from tests.stack_probes import assert_resumed, kill_a_train_worker_after

# CI checks resuming from a checkpoint with the harder fault, the whole node lost
# (test_node_failure.py); this one runs in `make test-reliability` and `make test-extended`.
pytestmark = pytest.mark.extended

EPOCHS = 6


def test_killed_worker_resumes_from_checkpoint(stack, trained):
    overrides = [f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}", "promotion.enabled=false"]
    job_id = submit_training(stack.settings, "jobs/configs/adult.yaml", overrides)
    kill_a_train_worker_after(stack.settings, job_id, timeout_s=300)

    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-3000:]
    result = training_result(logs)
    assert result is not None and result["epochs_run"] == EPOCHS

    assert_resumed(stack.settings, result["run_id"], EPOCHS)
