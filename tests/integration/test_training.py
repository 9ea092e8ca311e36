"""Training through the Ray Jobs API on a local Ray cluster, tracked in MLflow on PostgreSQL."""

import hashlib

import psycopg
from mlflow.tracking import MlflowClient

from core.settings import REPO_ROOT
from jobs.data.loading import combined_digest


def test_run_records_params_metrics_tags_and_model(stack, trained, pg_database):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    run = client.get_run(trained["run_id"])
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags

    assert params["train.num_workers"] == "2"
    assert params["train.epochs"] == "2"
    assert params["data.train_uri"] == "data/adult/adult.data.gz"
    for name in ("test_accuracy", "test_roc_auc", "test_f1", "test_log_loss"):
        assert 0 < metrics[name] < 1, name
    assert metrics["test_roc_auc"] > 0.85  # two epochs already separate the classes
    # Calibrated on the validation split: never worse than the raw probabilities there.
    assert metrics["calibration_temperature"] > 0
    assert metrics["val_ece_after"] <= metrics["val_ece_before"] + 1e-9

    # Where the job's time went, published on the run and in its result line.
    phases = trained["phases"]
    for name in ("driver_start", "data_load", "ray_init", "mlflow_setup", "fit_worker_start", "fit_epochs", "register"):
        assert phases[name] > 0, (name, phases)
        assert metrics[f"phase_{name}_s"] == phases[name]
    assert sum(phases.values()) - phases["driver_start"] <= trained["wall_time_s"] + 0.01

    history = client.get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in history] == list(range(len(history))) and 1 <= len(history) <= 2
    assert client.get_metric_history(run.info.run_id, "train_loss")

    files = {
        uri: hashlib.sha256((REPO_ROOT / uri).read_bytes()).hexdigest()
        for uri in ("data/adult/adult.data.gz", "data/adult/adult.test.gz")
    }
    assert tags["data.sha256"] == combined_digest(files)
    assert tags["data.sha256.train"] == files["data/adult/adult.data.gz"]
    assert len(tags["git_commit"]) in (7, 40) or tags["git_commit"] == "unknown"
    assert tags["ray.job_id"]
    assert tags["ray.working_dir"].startswith("gcs://_ray_pkg_")  # content hash of the shipped code

    # The tracking server really stores runs in this machine's PostgreSQL.
    with psycopg.connect(pg_database.replace("postgresql+psycopg", "postgresql")) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_uuid = %s", (run.info.run_id,)).fetchone()
    assert row == ("FINISHED",)


def test_version_is_registered_promoted_and_loadable(stack, trained):
    import mlflow
    import pandas as pd

    from serve_apps.schemas import EXAMPLE_ROW

    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    name, version = trained["model_name"], str(trained["model_version"])
    mv = client.get_model_version(name, version)
    assert mv.run_id is not None and mv.run_id == trained["run_id"]
    assert client.get_model_version_by_alias(name, "champion").version == version
    assert mv.tags["promotion.decision"] == "promoted"
    assert mv.tags["promotion.metric"] == "roc_auc"
    assert client.get_run(mv.run_id).data.tags["promotion.decision"] == "promoted"

    # The logged pyfunc carries its preprocessing: raw feature rows in, labels out.
    mlflow.set_tracking_uri(stack.settings.mlflow.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    out = model.predict(pd.DataFrame([EXAMPLE_ROW]))
    assert out["label"].iloc[0] in {"<=50K", ">50K"}
    assert model.metadata.get_input_schema() is not None

    # The version carries its calibration and the reference profile the drift monitor judges by.
    from jobs.registry import load_predictor

    predictor = load_predictor(f"models:/{name}/{version}", stack.settings.mlflow.tracking_uri)
    metrics = client.get_run(mv.run_id).data.metrics
    assert abs(predictor.temperature - metrics["calibration_temperature"]) < 1e-9
    profile = predictor.profile
    assert profile is not None and profile.classes == ["<=50K", ">50K"]
    assert set(profile.features) == set(predictor.schema.feature_names)
    assert profile.features["age"].kind == "numeric" and profile.features["workclass"].kind == "categorical"
    assert profile.calibration is not None and abs(profile.calibration.temperature - predictor.temperature) < 1e-9
    assert profile.reference_accuracy is not None and 0.7 < profile.reference_accuracy < 1
    assert abs(float(mv.tags["calibration.ece_after"]) - metrics["val_ece_after"]) < 1e-6


def test_promote_cli_rejects_a_version_that_does_not_beat_the_champion(stack, trained):
    from cluster.sandbox import run_cli

    version = str(trained["model_version"])
    result = run_cli("jobs.promote", "--model", trained["model_name"], "--version", version, env=stack.env, timeout=300)
    # Scoring the champion against itself never promotes (ties do not churn the alias).
    assert result.returncode == 3, result.stderr
    assert '"promote": false' in result.stdout
