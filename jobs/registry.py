"""MLflow model packaging and registry access."""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient

from core.audit import Actor
from jobs.predictor import TabularPredictor
from jobs.pyfunc import INFERENCE_MODULES, INFERENCE_REQUIREMENTS, PREDICTOR_ARTIFACT, TabularPyfunc
from jobs.rollout import alias_version
from jobs.tracking import artifact_upload

CONFIG_ARTIFACT = "job_config.json"
SCHEMA_ARTIFACT = "schema.json"
# Who asked for the training that produced a version: on the run and on the version.
REQUESTED_BY_TAG = "audit.requested_by"
REQUESTED_BY_JSON_TAG = "audit.requested_by.json"


def requester(audit_actor: str | None) -> Actor:
    """Who this job runs for: the actor the dispatcher handed over (the API key that queued the
    job, or the alert), else whoever runs the process (`ray job submit` or the CLI by hand)."""
    return Actor.from_json(audit_actor) or Actor.operator()


def requester_tags(actor: Actor) -> dict[str, str]:
    return {REQUESTED_BY_TAG: actor.label(), REQUESTED_BY_JSON_TAG: actor.to_json()}


def log_job_files(client: MlflowClient, run_id: str, config: dict[str, Any], schema_json: str) -> None:
    """The job's config and data schema on its run: `jobs.promote --version N` and the server read
    them back from the version's run."""
    with artifact_upload("the job's config and schema"):
        client.log_dict(run_id, config, CONFIG_ARTIFACT)
        client.log_text(run_id, schema_json, SCHEMA_ARTIFACT)


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in INFERENCE_REQUIREMENTS]


def _inference_package(directory: Path) -> Path:
    """A copy of this package with only the modules scoring needs, for the version's code_paths."""
    package = directory / "jobs"
    package.mkdir()
    source = Path(__file__).resolve().parent
    (package / "__init__.py").write_text('"""Inference modules of a registered model version."""\n', encoding="utf-8")
    for name in INFERENCE_MODULES:
        shutil.copy2(source / name, package / name)
    return package


def log_and_register(
    predictor: TabularPredictor,
    example: pd.DataFrame,
    model_name: str,
    client: MlflowClient,
    requested_by: Actor | None = None,
) -> ModelVersion:
    """Log the model (weights, preprocessing, signature, input example) into the active run and
    register a version with `client`'s registry, tagged with who asked for it."""
    features = example[predictor.schema.feature_names].head(5).reset_index(drop=True)
    # The signature keeps the data's own column types: MLflow will not cast int64 to a double
    # column, so declaring doubles would reject the integer rows that callers actually send.
    signature = infer_signature(features, predictor.predict_frame(features))
    with (
        tempfile.TemporaryDirectory() as tmp,
        warnings.catch_warnings(),
        # Artifacts go up before the version is registered: a refused upload registers nothing.
        artifact_upload(f"model {model_name!r} (no version registered)"),
    ):
        # The hint is about integer columns with missing values; ours have none (see above).
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
        directory = predictor.save(Path(tmp) / PREDICTOR_ARTIFACT)
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TabularPyfunc(),
            artifacts={PREDICTOR_ARTIFACT: str(directory)},
            code_paths=[str(_inference_package(Path(tmp)))],
            signature=signature,
            input_example=features,
            pip_requirements=_requirements(),
            registered_model_name=model_name,
        )
    version = info.registered_model_version
    if version is None:
        raise RuntimeError(f"model {model_name} was logged but not registered")
    tags = requester_tags(requested_by) if requested_by is not None else {}
    for key, value in {**tags, **calibration_tags(predictor)}.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return client.get_model_version(model_name, str(version))


def calibration_tags(predictor: TabularPredictor) -> dict[str, str]:
    """The version's calibration, where the registry shows it next to the version (the run has
    the same figures as metrics)."""
    calibration = predictor.profile.calibration if predictor.profile is not None else None
    if calibration is None:
        return {}
    return {
        "calibration.temperature": f"{calibration.temperature:.6f}",
        "calibration.ece_before": f"{calibration.ece_before:.6f}",
        "calibration.ece_after": f"{calibration.ece_after:.6f}",
    }


def download_model(model_uri: str, dst: Path, tracking_uri: str) -> Path:
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=model_uri, dst_path=str(dst), tracking_uri=tracking_uri, registry_uri=tracking_uri
    )
    return Path(path)


def predictor_dir(model_dir: Path) -> Path:
    """Where the pyfunc flavour keeps our artifact, as recorded in the MLmodel file."""
    meta = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    artifacts = meta["flavors"]["python_function"].get("artifacts", {})
    return model_dir / artifacts[PREDICTOR_ARTIFACT]["path"]


def load_predictor(model_uri: str, tracking_uri: str) -> TabularPredictor:
    with tempfile.TemporaryDirectory() as tmp:
        return TabularPredictor.load(predictor_dir(download_model(model_uri, Path(tmp), tracking_uri)))


def champion_version(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    """The version `alias` names; None only when the registry says the model or the alias does not
    exist, any other failure raises (`jobs.rollout.alias_version`)."""
    return alias_version(client, model_name, alias)


def run_config(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The job config a run was trained with, as it logged it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(client.download_artifacts(run_id, CONFIG_ARTIFACT, tmp))
        loaded: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return loaded
