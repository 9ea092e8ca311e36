"""Feedback snapshots against this machine's PostgreSQL and an S3 server over real HTTP (moto in
server mode), read back the way a training job reads them; and the gate's recent slice recorded in
a real MLflow registry."""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import psycopg
import pytest
from mlflow.tracking import MlflowClient

from cluster.sandbox import free_port, temporary_database
from core.settings import Settings
from jobs.config import DataConfig, JobConfig, load_config
from jobs.data.loading import load_splits
from jobs.feedback_data import TIME_COLUMN, read_snapshot, with_feedback
from jobs.promote import Rule, gate
from jobs.registry import log_and_register
from jobs.train import log_inputs
from services.dispatcher.snapshots import NoSnapshot, Snapshot, export_snapshot, parquet_bytes, snapshot_frame
from services.feedback.store import FeedbackStore, PredictionRow
from tests.local_http import moto_s3_server
from tests.predictors import untrained_predictor

MODEL = "adult-income"
ROWS: list[dict[str, Any]] = [
    {"age": 39, "workclass": "State-gov", "education": "Bachelors", "hours_per_week": 40},
    {"age": 50, "workclass": None, "education": "HS-grad", "hours_per_week": 13},
    {"age": 28, "workclass": "Private", "education": "Masters", "hours_per_week": 60},
]


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("feedback_snapshot_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


def _config(**feedback: Any) -> JobConfig:
    return load_config("jobs/configs/adult.yaml").with_overrides(
        {"feedback.enabled": True, **{f"feedback.{k}": v for k, v in feedback.items()}}
    )


async def _labelled(store: FeedbackStore, model: str, count: int, prefix: str = "r") -> None:
    """`count` predictions of `model` (two versions), every one labelled, one label a second apart
    in the order they were sent; and one prediction nobody labelled."""
    rows = [
        PredictionRow(f"{prefix}{i}", 0, model, str(1 + i % 2), "<=50K", 0.7, ROWS[i % len(ROWS)])
        for i in range(count + 1)
    ]
    await store.record_predictions(rows)
    for i in range(count):
        outcome = await store.add_feedback(f"{prefix}{i}", 0, ">50K" if i % 3 == 0 else "<=50K", 3600)
        assert outcome.label is not None


def _backdate(dsn: str, model: str) -> None:
    """Labels a second apart, so that "most recent" has one answer."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "UPDATE feedback SET created_at = now() - make_interval(secs => 1000 - "
            "substr(request_id, 2)::int) WHERE model_name = %s",
            (model,),
        )


def _export(dsn: str, settings: Settings, config: JobConfig, job: uuid.UUID, setup: int = 0) -> Snapshot | NoSnapshot:
    async def scenario() -> Snapshot | NoSnapshot:
        store = FeedbackStore(dsn, retry_for_s=2.0)
        await store.open()
        try:
            await store.migrate()
            if setup:
                await _labelled(store, MODEL, setup)
                await _labelled(store, "other-model", 5, prefix="o")
                _backdate(dsn, MODEL)
            return await export_snapshot(store, settings, config, job)
        finally:
            await store.close()

    return asyncio.run(scenario())


def test_a_snapshot_holds_the_models_most_recent_labels_and_is_reused_by_a_retry(dsn, tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path, s3={"bucket": None})
    job = uuid.uuid4()
    snapshot = _export(dsn, settings, _config(max_rows=60, min_rows=10), job, setup=80)
    assert isinstance(snapshot, Snapshot) and not snapshot.reused
    assert snapshot.uri == str(tmp_path.resolve() / "feedback" / MODEL / f"{job}.parquet")
    assert snapshot.rows == 60
    frame, digest = read_snapshot(snapshot.uri, snapshot.sha256)
    assert digest == snapshot.sha256
    # Only this model's labelled rows, the 60 most recent, oldest first, label under the target.
    assert list(frame.columns) == ["age", "education", "hours_per_week", "workclass", "income", TIME_COLUMN]
    assert frame[TIME_COLUMN].is_monotonic_increasing
    assert set(frame["income"]) == {"<=50K", ">50K"}
    assert frame["age"].tolist()[:3] == [float(ROWS[i % 3]["age"]) for i in range(20, 23)]
    assert frame["workclass"].isna().sum() == 20
    # A retry of the same job trains on the same rows, whatever arrived since.
    again = _export(dsn, settings, _config(max_rows=1000, min_rows=10), job)
    assert isinstance(again, Snapshot) and again.reused
    assert (again.uri, again.sha256, again.rows) == (snapshot.uri, snapshot.sha256, 60)
    assert "from an earlier attempt" in again.describe()
    # Another job takes a snapshot of its own.
    other = _export(dsn, settings, _config(max_rows=1000, min_rows=10), uuid.uuid4())
    assert isinstance(other, Snapshot) and other.rows == 80 and other.uri != snapshot.uri


def test_too_little_feedback_is_no_snapshot_and_says_so(dsn, tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path, s3={"bucket": None})
    result = _export(dsn, settings, _config(min_rows=50), uuid.uuid4(), setup=12)
    assert isinstance(result, NoSnapshot) and (result.rows, result.min_rows) == (12, 50)
    assert result.describe() == (
        "no feedback snapshot: 12 labelled rows of adult-income, fewer than feedback.min_rows 50; "
        "training without feedback"
    )
    assert not (tmp_path / "feedback").exists()


def test_an_unreachable_database_is_an_error_not_an_empty_snapshot(tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path, s3={"bucket": None})

    async def scenario() -> None:
        store = FeedbackStore(f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere", retry_for_s=0.5)
        await store.open()
        try:
            await export_snapshot(store, settings, _config(), uuid.uuid4())
        finally:
            await store.close()

    with pytest.raises(Exception) as raised:
        asyncio.run(scenario())
    assert "connect" in str(raised.value).lower() or "timeout" in type(raised.value).__name__.lower()


@pytest.fixture(scope="module")
def s3_server() -> Iterator[str]:
    with moto_s3_server() as url:
        yield url


def test_with_an_object_store_the_snapshot_goes_there_and_the_job_reads_it(dsn, s3_server, tmp_path):
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        s3={"endpoint_url": s3_server, "bucket": "platform-test"},
        aws={"access_key_id": "testing-id", "secret_access_key": "testing-secret"},
    )
    job = uuid.uuid4()
    config = _config(min_rows=10, holdout_fraction=0.25)
    snapshot = _export(dsn, settings, config, job, setup=40)
    assert isinstance(snapshot, Snapshot)
    assert snapshot.uri == f"s3://platform-test/datasets/feedback/{MODEL}/{job}.parquet"
    assert not (tmp_path / "feedback").exists()
    again = _export(dsn, settings, config, job)
    assert isinstance(again, Snapshot) and again.reused and again.sha256 == snapshot.sha256
    # The training job, given what the dispatcher adds to its spec, reads and splits it.
    trained = config.with_overrides(snapshot.overrides())
    splits = load_splits(trained)
    merged = with_feedback(splits, trained, settings)
    assert merged.recent is not None and len(merged.recent) == 10
    # The 30 older rows train and validate (a data.val_fraction share of them validates).
    assert len(merged.train) + len(merged.val) == len(splits.train) + len(splits.val) + 30
    assert len(merged.val) == len(splits.val) + round(30 * trained.data.val_fraction)
    assert merged.digests[snapshot.uri] == snapshot.sha256


def test_the_gate_records_both_models_on_the_recent_slice(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("gate", artifact_location=str(tmp_path / "a")))
        client = MlflowClient(uri)
        rng = np.random.default_rng(0)
        frame = pd.DataFrame({"age": rng.integers(18, 80, 300), "sex": rng.choice(["Female", "Male"], 300)})
        frame["income"] = np.where(frame["age"] + rng.normal(0, 10, 300) > 45, ">50K", "<=50K")
        config = JobConfig(name="income", data=DataConfig(train_uri="memory", target="income"))
        # Untrained models: any candidate beats the champion on both splits by these rules.
        config = config.with_overrides({"promotion.margin": -1.0, "promotion.test_tolerance": 1.0})
        versions = []
        for _ in range(2):
            predictor = untrained_predictor(frame, config)
            with mlflow.start_run():
                versions.append((log_and_register(predictor, frame, "income", client).version, predictor))
        (first, champion), (second, candidate) = versions
        gate(client, "income", "champion", first, champion, config, frame)
        recent = frame.iloc[-40:]
        decision = gate(client, "income", "champion", second, candidate, config, frame.iloc[:-40], recent=recent)
        assert decision.promote and decision.rule is Rule.SCORE and decision.recent_rows == 40
        assert decision.recent_candidate_score is not None and decision.recent_champion_score is not None
        assert "on the recent slice (40 rows)" in decision.reason and "on the test split" in decision.reason
        version = client.get_model_version("income", second)
        tags = version.tags
        assert tags["promotion.recent_rule"] == "recent_and_test" and tags["promotion.recent_rows"] == "40"
        assert float(tags["promotion.recent_candidate_score"]) == pytest.approx(
            decision.recent_candidate_score, abs=1e-6
        )
        assert float(tags["promotion.recent_champion_score"]) == pytest.approx(decision.recent_champion_score, abs=1e-6)
        metrics = client.get_run(str(version.run_id)).data.metrics
        assert metrics["promotion_recent_rows"] == 40
        assert metrics["promotion_recent_champion_score"] == pytest.approx(decision.recent_champion_score)
        # A slice the metric cannot score (one class: no ROC AUC) cannot decide: the test split does.
        third = untrained_predictor(frame, config)
        with mlflow.start_run():
            third_version = log_and_register(third, frame, "income", client).version
        one_class = recent.assign(income="<=50K")
        undecided = gate(client, "income", "champion", third_version, third, config, frame, recent=one_class)
        assert undecided.rule is Rule.SCORE and not undecided.rule.refusal
        assert "(the recent slice (40 rows) cannot decide: ValueError: roc_auc is not defined" in undecided.reason
        assert undecided.recent_rows == 40 and undecided.recent_candidate_score is None
        # An empty slice is no slice: the test split decides, as for a job without feedback.
        fourth = untrained_predictor(frame, config)
        with mlflow.start_run():
            fourth_version = log_and_register(fourth, frame, "income", client).version
        plain = gate(client, "income", "champion", fourth_version, fourth, config, frame, recent=recent.iloc[:0])
        assert plain.promote and plain.recent_rows is None
    finally:
        mlflow.set_tracking_uri(previous)


def test_the_run_logs_the_snapshot_as_a_dataset_input_with_its_row_counts(tmp_path):
    config = load_config("jobs/configs/adult.yaml")
    splits = load_splits(config)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = [
        (json.loads(row.drop(labels=["income"]).to_json()), str(row["income"]), start + timedelta(minutes=i))
        for i, (_, row) in enumerate(splits.test.iloc[:50].iterrows())
    ]
    data = parquet_bytes(snapshot_frame(rows, "income"))
    path = tmp_path / "snapshot.parquet"
    path.write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    trained = config.with_overrides({"data.feedback_uri": str(path), "data.feedback_sha256": sha256})
    merged = with_feedback(splits, trained)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("inputs", artifact_location=str(tmp_path / "a")))
        with mlflow.start_run() as run:
            log_inputs(merged, trained, "digest")
        logged = MlflowClient(uri).get_run(run.info.run_id)
    finally:
        mlflow.set_tracking_uri(previous)
    params = logged.data.params
    counts = [params[f"data.feedback_{kind}rows"] for kind in ("", "train_", "recent_")]
    assert counts == ["50", "35", "15"]
    assert logged.inputs is not None
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i for i in logged.inputs.dataset_inputs}
    assert set(inputs) == {"train", "validation", "test", "feedback"}
    feedback = inputs["feedback"]
    assert {t.key: t.value for t in feedback.tags}["sha256"] == sha256
    assert str(path) in feedback.dataset.source
