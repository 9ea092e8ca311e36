"""The MLflow artifact store fills up while a model trains: the job fails within a bounded time with
an error that names the store, registers and promotes nothing, and the champion keeps serving.

The store is the stack's own (the tracking server's `--artifacts-destination`, which the job reaches
through the server's artifact proxy, as users do). Only the directory of an experiment of this test
is a small tmpfs, filled once training is under way: the rest of the store, the champion's model
files among them, stays as it was for the other tests of the session.
"""

from __future__ import annotations

import errno
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack
from core.health import wait_until
from services.ray_submission import jobs_client, submit_training
from tests.reliability.faults import prediction_load, stopped_when_done, wait_for_job
from tests.reliability.load import summarise

EPOCHS = 4
# Room for the run's first artifacts (its config and schema, a few kB), not for a model.
STORE_SIZE = "1m"
# MLflow's client gives up after about a minute of retries (jobs.tracking); the rest is evaluation
# and the job's exit on a loaded machine.
FAIL_WITHIN_S = 180


def fill(directory: Path) -> int:
    """Write zeros into `directory` until its file system is full; returns the bytes written."""
    written = 0
    chunk = bytes(64 * 1024)
    with (directory / "filler").open("wb", buffering=0) as out:
        while True:
            try:
                written += out.write(chunk) or 0
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return written


def mount_tmpfs(directory: Path, size: str) -> None:
    directory.mkdir(parents=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        directory.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def unmount(directory: Path) -> None:
    # Lazily if the server still holds a file open there: the mount goes with its last user.
    if subprocess.run(["umount", str(directory)], capture_output=True, check=False).returncode != 0:
        subprocess.run(["umount", "--lazy", str(directory)], check=True)
    directory.rmdir()


def test_full_artifact_store_fails_the_job_and_the_champion_keeps_serving(
    stack: Stack, trained: dict[str, Any], figures: dict[str, Any]
) -> None:
    destination = stack.settings.resolved_artifacts_destination
    if destination.startswith("s3://"):
        pytest.skip("the stack's artifact store is S3; this test fills a local one")
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mlflow = MlflowClient(stack.settings.mlflow.tracking_uri)
    model_name, alias = trained["model_name"], stack.settings.champion_alias
    champion = mlflow.get_model_version_by_alias(model_name, alias).version
    versions_before = {v.version for v in mlflow.search_model_versions(f"name='{model_name}'")}
    experiment = f"artifact-store-full-{uuid.uuid4().hex[:8]}"
    experiment_id = mlflow.create_experiment(experiment)
    # Proxied: the server writes this experiment's artifacts under <destination>/<experiment id>.
    assert mlflow.get_experiment(experiment_id).artifact_location == f"mlflow-artifacts:/{experiment_id}"
    store = Path(destination) / experiment_id
    server_log = stack.settings.logs_dir / "mlflow.log"
    server_log_offset = server_log.stat().st_size
    mount_tmpfs(store, STORE_SIZE)
    try:
        with prediction_load(stack) as load:
            # The champion's model name and promotion on: what the job would replace, were it to finish.
            overrides = [f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}", "train.num_workers=1"]
            # Two retries instead of the driver's five: the same path to the same error, 45 s sooner
            # (a user's setting of the variable wins over the driver's default, as here).
            env = {"MLFLOW_EXPERIMENT": experiment, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2"}
            job_id = submit_training(stack.settings, "jobs/configs/adult.yaml", overrides, env=env)
            with stopped_when_done(stack, job_id):
                jobs = jobs_client(stack.settings)
                started = wait_until(lambda: "Reporting training result 1:" in jobs.get_job_logs(job_id), 300, 1)
                assert started, jobs.get_job_logs(job_id)[-3000:]
                filled = fill(store)
                before = load.count
                status, logs, failed_after_s = wait_for_job(stack, job_id, FAIL_WITHIN_S)
                during = summarise(load.outcomes[before:])
            # And after: the failed job changed nothing for the API's clients.
            load.wait_for_count(load.count + 20, 30)
        run_id, run_status = _only_run(mlflow, experiment_id)
        epochs = [m.step for m in mlflow.get_metric_history(run_id, "val_loss")]
    finally:
        unmount(store)
        mlflow.delete_experiment(experiment_id)

    assert status == "FAILED", logs[-3000:]
    # One message in the job's log names the store, what went wrong there and where to look.
    assert f"ArtifactStoreError: could not store model {model_name!r} (no version registered)" in logs, logs[-3000:]
    assert f"in the MLflow artifact store at mlflow-artifacts:/{experiment_id}/" in logs, logs[-3000:]
    assert "probably full or not writable" in logs and "--artifacts-destination" in logs, logs[-3000:]
    # The server's log has the cause the client only sees as HTTP 500s.
    with server_log.open(errors="replace") as log:
        log.seek(server_log_offset)
        assert "No space left on device" in log.read()
    # Trained to the end, then refused: the run marked failed, nothing registered, nothing promoted.
    assert run_status == "FAILED" and sorted(epochs) == list(range(EPOCHS)), (run_status, epochs)
    assert {v.version for v in mlflow.search_model_versions(f"name='{model_name}'")} == versions_before
    assert mlflow.get_model_version_by_alias(model_name, alias).version == champion
    summary = load.summary()
    assert summary.failed == 0 and during.requests > 0, summary.as_dict()
    assert set(summary.versions) == {champion}, summary.as_dict()
    figures["artifact_store_full"] = {
        "filled_bytes": filled,
        "failed_after_fill_s": round(failed_after_s, 1),
        "epochs_run": len(epochs),
        "predictions_during_fault": during.as_dict(),
        "predictions_in_all": summary.as_dict(),
    }


def _only_run(mlflow: MlflowClient, experiment_id: str) -> tuple[str, str]:
    (run,) = mlflow.search_runs([experiment_id])
    return str(run.info.run_id), str(run.info.status)
