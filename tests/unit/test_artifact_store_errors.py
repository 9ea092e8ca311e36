"""Failures of the MLflow artifact store named as such, other errors left alone, and the custom
worker resources that place training on a group of nodes."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from pydantic import ValidationError

from jobs.config import load_config, parse_override
from jobs.tracking import ArtifactStoreError, artifact_upload


def test_a_refused_upload_names_the_store(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("a file where the store's directory should be")
    source = tmp_path / "model.bin"
    source.write_bytes(b"weights")
    expected = "could not store the model in the MLflow artifact store"
    with pytest.raises(ArtifactStoreError, match=expected) as raised, artifact_upload("the model"):
        LocalArtifactRepository(str(blocked / "artifacts")).log_artifact(str(source))
    assert "probably full or not writable" in str(raised.value)
    assert isinstance(raised.value.__cause__, OSError)


def test_errors_from_elsewhere_pass_unchanged() -> None:
    with pytest.raises(ValueError, match="not an artifact problem"), artifact_upload("the model"):
        raise ValueError("not an artifact problem")


def test_workers_take_custom_resources_from_an_override() -> None:
    override = "train.resources_per_worker={trainer: 1}"
    # As `services.ray_submission.submit_training` quotes it for the job's shell entrypoint.
    (argument,) = shlex.split(shlex.quote(override))
    config = load_config("jobs/configs/adult.yaml").with_overrides(dict([parse_override(argument)]))
    assert config.train.resources_per_worker == {"trainer": 1.0}
    assert load_config("jobs/configs/adult.yaml").train.resources_per_worker == {}


@pytest.mark.parametrize("resources", [{"CPU": 1}, {"GPU": 1}, {"trainer": 0}])
def test_cpus_gpus_and_empty_amounts_are_refused_as_custom_resources(resources: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="resources_per_worker"):
        load_config("jobs/configs/adult.yaml").with_overrides({"train.resources_per_worker": resources})
