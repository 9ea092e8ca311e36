"""A Ray worker node lost mid-training, its whole machine at once (raylet, agents and Train workers
SIGKILLed, nothing told to the GCS). Ray Train fails the worker group and waits for resources; a
replacement node with the same resources joins, as an autoscaler or KubeRay would bring one up,
and the run resumes there from its last checkpoint and finishes.

The Train workers are pinned to the fault nodes with a custom resource (`train.resources_per_worker`)
that the head does not advertise: without it the restarted group would just move to the head.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack
from core.health import wait_until
from jobs.result import training_result
from services.ray_submission import jobs_client, submit_training
from tests.ray_nodes import kill_node, node_state, ray_node, state
from tests.reliability.faults import prediction_load, stopped_when_done, wait_for_job
from tests.reliability.load import summarise

RESOURCE = "fault_trainer"
WORKERS = 2
EPOCHS = 6
MODEL_NAME = "node-failure-test"
OVERRIDES = [
    f"train.epochs={EPOCHS}",
    f"train.patience={EPOCHS}",
    f"train.num_workers={WORKERS}",
    f"train.resources_per_worker={{{RESOURCE}: 1}}",
    # A model of its own and no promotion: the session's champion stays what other tests made it.
    f"model_name={MODEL_NAME}",
    "promotion.enabled=false",
]
REPORT = re.compile(r"Reporting training result (\d+):")


# Minutes of a second Ray node joining, training, dying and being replaced: `make test-extended`.
# `make test` keeps the head-side faults (tests/reliability/test_training_queue_faults.py).
pytestmark = pytest.mark.extended


def train_workers(stack: Stack, job_id: str) -> list[tuple[str, str]]:
    """(node id, state) of every Ray Train worker the job has had."""
    ray_job_id = jobs_client(stack.settings).get_job_info(job_id).job_id
    assert ray_job_id is not None
    actors = state(stack, "actors", [("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)])
    return [(str(a.node_id), str(a.state)) for a in actors]


def test_training_resumes_on_a_replacement_node_after_its_node_is_lost(
    stack: Stack, trained: dict[str, Any], figures: dict[str, Any]
) -> None:
    jobs = jobs_client(stack.settings)
    mlflow = MlflowClient(stack.settings.mlflow.tracking_uri)
    # Read now, not taken from `trained`: another test of the session may have promoted since.
    champion = mlflow.get_model_version_by_alias(trained["model_name"], stack.settings.champion_alias).version
    resources = {RESOURCE: float(WORKERS)}
    with ray_node(stack, "ray-lost1", resources, WORKERS) as lost:
        job_id = submit_training(stack.settings, "jobs/configs/adult.yaml", OVERRIDES)
        with stopped_when_done(stack, job_id), prediction_load(stack) as load:

            def job_logs() -> str:
                return str(jobs.get_job_logs(job_id))

            # Two checkpoints reported: the run has one to resume from, and is not finished.
            assert wait_until(lambda: "Reporting training result 2:" in job_logs(), 300, 1), job_logs()[-3000:]
            alive = [node for node, actor_state in train_workers(stack, job_id) if actor_state == "ALIVE"]
            assert alive == [lost.node_id] * WORKERS, alive

            killed_at = time.time()
            before = load.count
            kill_node(lost)
            # Report n carries the checkpoint of epoch n - 1; no worker is left to add one.
            last_checkpoint = max(int(n) for n in REPORT.findall(job_logs())) - 1
            assert wait_until(lambda: node_state(stack, lost.node_id) == "DEAD", 90), node_state(stack, lost.node_id)
            seen_dead_s = time.time() - killed_at

            with ray_node(stack, "ray-lost2", resources, WORKERS) as replacement:
                replaced_s = time.time() - killed_at
                status, logs, _ = wait_for_job(stack, job_id, 300)
                finished_s = time.time() - killed_at
                during = summarise(load.outcomes[before:])
                assert status == "SUCCEEDED", logs[-3000:]
                workers = train_workers(stack, job_id)
                # The group that finished ran on the replacement, none of it on the head.
                assert {node for node, _ in workers} == {lost.node_id, replacement.node_id}, workers

    result = training_result(logs)
    assert result is not None and result["epochs_run"] == EPOCHS, logs[-3000:]
    history = mlflow.get_metric_history(result["run_id"], "val_loss")
    steps = sorted(m.step for m in history)
    assert set(steps) == set(range(EPOCHS)), steps
    # Resumed, not restarted: the epochs logged after the kill start past epoch 0, at most at the
    # epoch after the last checkpoint reported before it (one the controller had not yet collected
    # when the node went would move it back by one, never to the start).
    after_kill = sorted(m.step for m in history if m.timestamp >= killed_at * 1000)
    resumed_at = after_kill[0]
    assert 1 <= resumed_at <= last_checkpoint + 1, (last_checkpoint, after_kill)
    # Run twice: at most the epoch in flight at the kill, and the one whose checkpoint was not collected.
    assert len(steps) - EPOCHS <= 2, steps
    # The champion kept answering while the node was lost: it serves from the head.
    assert during.requests > 0 and during.failed == 0, during.as_dict()
    assert set(load.summary().versions) == {champion}, load.summary().as_dict()
    figures["node_lost_mid_training"] = {
        "last_checkpoint_epoch": last_checkpoint,
        "resumed_at_epoch": resumed_at,
        "epochs_logged": len(steps),
        "epochs": EPOCHS,
        "node_dead_after_s": round(seen_dead_s, 1),
        "replacement_joined_after_s": round(replaced_s, 1),
        "succeeded_after_kill_s": round(finished_s, 1),
        "predictions_during_fault": during.as_dict(),
    }
