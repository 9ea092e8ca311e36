"""Where training keeps its checkpoints: the state dir by default, the bucket once S3 is set, and
a clear refusal when the bucket does not answer."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from cluster.sandbox import free_port, settings_from
from core.settings import Settings
from jobs.run_store import RunStoreUnreachableError, require_run_store, run_store, unreachable_reason
from jobs.train import run_store_errors
from tests.compose_file import environment, services


def settings(tmp_path: Path, **s3: str | None) -> Settings:
    return Settings(_env_file=None, state_dir=tmp_path, s3=s3)


def test_without_a_bucket_checkpoints_stay_in_the_state_dir(tmp_path: Path) -> None:
    store = run_store(settings(tmp_path))
    assert store.uri == store.path == str(tmp_path / "ray_results")
    assert store.filesystem is None and not store.remote
    assert store.run_config_kwargs() == {"storage_path": str(tmp_path / "ray_results"), "storage_filesystem": None}


def test_with_a_bucket_checkpoints_go_to_it_through_the_configured_endpoint(tmp_path: Path) -> None:
    store = run_store(settings(tmp_path, bucket="platform", endpoint_url="http://127.0.0.1:9000"))
    assert store.uri == "s3://platform/ray-results"
    # Ray wants the scheme stripped when it is handed the filesystem.
    assert store.path == "platform/ray-results"
    assert isinstance(store.filesystem, pafs.S3FileSystem)
    assert store.filesystem.region == "us-east-1"
    assert store.run_config_kwargs()["storage_filesystem"] is store.filesystem


def test_an_explicit_storage_path_wins_over_the_bucket(tmp_path: Path) -> None:
    chosen = Settings(
        _env_file=None, state_dir=tmp_path, s3={"bucket": "platform"}, ray={"storage_path": "s3://runs/team-a"}
    )
    store = run_store(chosen)
    assert (store.uri, store.path) == ("s3://runs/team-a", "runs/team-a")
    local = Settings(
        _env_file=None, state_dir=tmp_path, s3={"bucket": "platform"}, ray={"storage_path": "/mnt/shared/runs"}
    )
    assert run_store(local).filesystem is None and run_store(local).path == "/mnt/shared/runs"


def test_a_local_store_is_never_probed(tmp_path: Path) -> None:
    store = run_store(settings(tmp_path))
    assert unreachable_reason(store) is None
    require_run_store(store)


def test_an_unreachable_bucket_is_refused_within_seconds_naming_the_store(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = run_store(settings(tmp_path, bucket="platform", endpoint_url=dead))
    started = time.monotonic()
    with pytest.raises(RunStoreUnreachableError) as refused:
        require_run_store(store)
    assert time.monotonic() - started < 60
    message = str(refused.value)
    assert "s3://platform/ray-results is not reachable" in message
    assert "registers nothing" in message and "S3_ENDPOINT_URL" in message


def test_a_failed_fit_on_an_unreachable_store_says_why(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    store = run_store(settings(tmp_path, bucket="platform", endpoint_url=dead))
    with pytest.raises(RunStoreUnreachableError, match="not reachable") as raised, run_store_errors(store):
        raise RuntimeError("Training failed: worker group errored")
    assert isinstance(raised.value.__cause__, RuntimeError)


def test_a_failed_fit_on_a_healthy_store_keeps_its_own_error(tmp_path: Path) -> None:
    store = run_store(settings(tmp_path))
    with pytest.raises(ValueError, match="bad loss"), run_store_errors(store):
        raise ValueError("bad loss")


def interpolated(env: dict[str, str]) -> dict[str, str]:
    """A service's environment as compose hands it over with no .env: defaults taken, required
    values given a placeholder."""

    def value(match: re.Match[str]) -> str:
        return match.group(3) if match.group(2) == ":-" else "required-value"

    return {k: VARIABLE.sub(value, v) for k, v in env.items()}


VARIABLE = re.compile(r"\$\{([A-Za-z_]\w*)(:[-?])?([^}]*)\}")


def test_compose_keeps_every_artifact_of_a_run_in_minio() -> None:
    """The production settings (compose.yaml): checkpoints and Tune results, MLflow's artifacts and
    data sets all resolve to MinIO's buckets, reached at MinIO's endpoint; none to a node's disk."""
    described = services()
    for name in ("ray-head", "ray-worker", "dispatcher"):
        env = interpolated(environment(described[name]))
        configured = settings_from(env)
        store = run_store(configured)
        assert store.uri.startswith("s3://") and isinstance(store.filesystem, pafs.S3FileSystem), name
        assert configured.s3.endpoint_url == "http://minio:9000" and configured.s3.bucket, name
    mlflow = interpolated(environment(described["mlflow"]))
    assert mlflow["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert settings_from(mlflow).resolved_artifacts_destination == mlflow["MLFLOW_ARTIFACTS_DESTINATION"]
