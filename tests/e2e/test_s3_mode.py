"""The production storage path: a stack whose object store is an S3-compatible server over real HTTP
(moto in server mode, started here; MinIO in compose). With S3_ENDPOINT_URL and S3_BUCKET set, every
durable file of a training run lives in the bucket: the data sets it reads (pushed as `make demo`
pushes them), MLflow's artifacts (the server proxies them to `s3://<bucket>/mlflow`), Ray Train's
checkpoints (`s3://<bucket>/ray-results`), and nothing of them on local disk. The registered version
is served by a replica that loads it from there; a Train worker killed mid-run resumes from its S3
checkpoint; and with the bucket gone mid-run the job fails, saying so, and registers nothing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from cluster.demo import data_in_bucket, wait_for_version
from cluster.sandbox import Stack, hermetic_stack, temporary_database
from core.health import wait_until
from jobs.data.storage import s3_client
from jobs.result import training_result
from serve_apps.schemas import EXAMPLE_ROW
from services.ray_submission import follow_job, jobs_client, submit_training
from tests.local_http import MotoS3, moto_s3
from tests.stack_probes import assert_resumed, kill_a_train_worker_after

CONFIG = "jobs/configs/adult.yaml"
BUCKET = "platform-s3-mode"
EPOCHS = 6


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3]:
    with moto_s3() as server:
        yield server


@pytest.fixture(scope="module")
def s3_stack(s3: MotoS3) -> Iterator[Stack]:
    """A whole stack in S3 mode, MLflow's store on this machine's PostgreSQL as in production."""
    with temporary_database("mlflow_s3") as database:
        overrides = {
            "S3_ENDPOINT_URL": s3.url,
            "S3_BUCKET": BUCKET,
            "AWS_ACCESS_KEY_ID": "s3-mode-id",
            "AWS_SECRET_ACCESS_KEY": "s3-mode-secret",
            "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://postgres@127.0.0.1:5432/{database}",
            # The session's token: this process's Ray client presents the one it was started with.
            "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"],
            # Not what this module checks: fewer processes on a small machine.
            "PROMETHEUS_ENABLED": "false",
            "MONITOR_ENABLED": "false",
            "ROLLOUT_ENABLED": "false",
            "PROBATION_ENABLED": "false",
        }
        with hermetic_stack("s3mode", overrides) as stack:
            yield stack


def bucket_keys(stack: Stack, prefix: str = "") -> list[str]:
    pages = s3_client(stack.settings).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


def run_resumed_after_a_kill(stack: Stack) -> dict[str, Any]:
    """A training job reading its data from the bucket, one of whose Train workers is killed after
    its second checkpoint: its result line, logs and data overrides."""
    data = data_in_bucket(stack.settings, CONFIG)
    job_id = submit_training(stack.settings, CONFIG, [*data, f"train.epochs={EPOCHS}", f"train.patience={EPOCHS}"])
    kill_a_train_worker_after(stack.settings, job_id)
    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    return {"result": result, "logs": logs, "data": dict(o.split("=", 1) for o in data)}


@pytest.fixture(scope="module")
def run(s3_stack: Stack) -> dict[str, Any]:
    return run_resumed_after_a_kill(s3_stack)


def test_the_job_reads_its_data_sets_from_the_bucket(s3_stack: Stack, run: dict[str, Any]) -> None:
    uris = run["data"]
    assert set(uris) == {"data.train_uri", "data.test_uri"}
    for uri in uris.values():
        assert uri.startswith(f"s3://{BUCKET}/datasets/adult-income/"), uri
        assert uri.removeprefix(f"s3://{BUCKET}/") in bucket_keys(s3_stack, "datasets/")
    params = MlflowClient(s3_stack.settings.mlflow.tracking_uri).get_run(run["result"]["run_id"]).data.params
    assert {params["data.train_uri"], params["data.test_uri"]} == set(uris.values())


def test_the_registered_version_is_in_the_bucket_and_nowhere_on_disk(s3_stack: Stack, run: dict[str, Any]) -> None:
    client = MlflowClient(s3_stack.settings.mlflow.tracking_uri)
    result = run["result"]
    version = client.get_model_version(result["model_name"], str(result["model_version"]))
    # A version's source names its logged model (models:/m-...), which knows where its files are.
    assert version.source is not None and version.source.startswith("models:/m-"), version.source
    location = client.get_logged_model(version.source.removeprefix("models:/")).artifact_location
    # The server proxies artifacts: clients name them mlflow-artifacts:/..., the server keeps them
    # under the bucket's mlflow/ prefix.
    assert location.startswith("mlflow-artifacts:/"), location
    prefix = "mlflow/" + location.removeprefix("mlflow-artifacts:").strip("/") + "/"
    files = {key.removeprefix(prefix) for key in bucket_keys(s3_stack, prefix)}
    assert "MLmodel" in files, sorted(files)
    state = s3_stack.settings.state_dir
    assert not (state / "mlartifacts").exists()
    assert not list(state.rglob("MLmodel")), "a model's files were kept on local disk"


def test_a_killed_worker_resumes_from_its_s3_checkpoint(s3_stack: Stack, run: dict[str, Any]) -> None:
    result = run["result"]
    assert result["epochs_run"] == EPOCHS
    assert_resumed(s3_stack.settings, result["run_id"], EPOCHS)
    run_name = f"adult-income-{result['run_id']}"
    checkpoints = [key for key in bucket_keys(s3_stack, f"ray-results/{run_name}/") if "/checkpoint_" in key]
    assert checkpoints, bucket_keys(s3_stack, "ray-results/")
    assert not (s3_stack.settings.state_dir / "ray_results").exists()
    assert not (Path.home() / "ray_results" / run_name).exists()


def test_the_champion_is_served_from_the_bucket(s3_stack: Stack, run: dict[str, Any]) -> None:
    version = str(run["result"]["model_version"])
    assert run["result"]["promotion"]["promote"], run["result"]["promotion"]
    assert wait_for_version(s3_stack.settings, version, 180), "the replica did not load the champion"
    with s3_stack.client() as client:
        response = client.post("/v1/predict", json={"instances": [EXAMPLE_ROW]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert str(body["model"]["version"]) == version and len(body["predictions"]) == 1


def test_a_tuning_run_keeps_its_results_and_trial_checkpoints_in_the_bucket(
    s3_stack: Stack, run: dict[str, Any]
) -> None:
    data = [f"{k}={v}" for k, v in run["data"].items()]
    overrides = [
        *data,
        "model_name=adult-income-tuned",  # its own model: the champion above stays served
        "train.epochs=1",
        "train.patience=1",
        "tune.num_samples=1",
        "tune.max_concurrent_trials=1",
        "tune.grace_period=1",
    ]
    job_id = submit_training(s3_stack.settings, "jobs/configs/adult-tune.yaml", overrides, module="jobs.tune")
    status, logs = follow_job(s3_stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    # Tune's experiment (jobs.tune names it after the parent run) and each trial's Train run.
    experiment = f"tune-adult-income-{result['run_id'][:8]}"
    tune_keys = bucket_keys(s3_stack, f"ray-results/{experiment}/")
    assert any("experiment_state" in key or key.endswith("tuner.pkl") for key in tune_keys), tune_keys
    trials = [key for key in bucket_keys(s3_stack, f"ray-results/{experiment}-") if "/checkpoint_" in key]
    assert trials, bucket_keys(s3_stack, "ray-results/")
    assert not (s3_stack.settings.state_dir / "ray_results").exists()
    assert not (Path.home() / "ray_results" / experiment).exists()


def test_a_run_leaves_its_data_artifacts_and_checkpoints_in_the_bucket(s3_stack: Stack, run: dict[str, Any]) -> None:
    """What the runs above (a training run, a tuning run) leave in the bucket, by top-level prefix
    (the whole listing is in the test's output)."""
    keys = bucket_keys(s3_stack)
    by_prefix: dict[str, int] = {}
    for key in keys:
        by_prefix[key.split("/", 1)[0]] = by_prefix.get(key.split("/", 1)[0], 0) + 1
    print(f"s3://{BUCKET}: " + ", ".join(f"{prefix}/ {count} objects" for prefix, count in sorted(by_prefix.items())))
    for key in keys:
        print(f"  {key}")
    assert {"datasets", "mlflow", "ray-results"} <= set(by_prefix)


# Last in the module: it stops the store.
def test_the_bucket_gone_mid_run_fails_the_job_clearly_and_registers_nothing(
    s3_stack: Stack, s3: MotoS3, run: dict[str, Any]
) -> None:
    settings = s3_stack.settings
    client = MlflowClient(settings.mlflow.tracking_uri)
    name = run["result"]["model_name"]
    versions_before = {v.version for v in client.search_model_versions(f"name = '{name}'")}
    job_id = submit_training(settings, CONFIG, [*(f"{k}={v}" for k, v in run["data"].items()), "train.epochs=40"])
    jobs = jobs_client(settings)
    assert wait_until(lambda: "Reporting training result 1:" in jobs.get_job_logs(job_id), 600, max_wait_s=1)
    s3.stop()
    status, logs = follow_job(settings, job_id)
    assert status == "FAILED", logs[-4000:]
    assert f"the run store s3://{BUCKET}/ray-results is not reachable" in logs, logs[-4000:]
    print(next(line for line in logs.splitlines() if "is not reachable (" in line))
    assert "registers nothing" in logs
    assert training_result(logs) is None
    assert {v.version for v in client.search_model_versions(f"name = '{name}'")} == versions_before
    experiment = client.get_experiment_by_name(settings.mlflow.experiment)
    assert experiment is not None
    latest = client.search_runs(
        [experiment.experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    assert latest.info.run_id != run["result"]["run_id"] and latest.info.status == "FAILED"
