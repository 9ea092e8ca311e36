"""The live drift monitor against a real PostgreSQL: recorded predictions of each model version are
judged against the version's reference profile (built by the training code from a small real
predictor), published as Prometheus gauges, stored per version, and expired after their retention.
Then the whole path in one process: the inference API's own routes record predictions with their
outputs, the monitor reads the profile from a real MLflow registry (SQLite), and
GET /v1/models/{name}/monitoring answers with the stored report and the measured feedback."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import mlflow
import numpy as np
import pandas as pd
import psycopg
import pytest
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from cluster.sandbox import temporary_database
from core.keys import KeyStore, Principal, Scope, hash_api_key, key_id_of
from core.settings import Settings
from jobs.config import DataConfig, JobConfig
from jobs.finish import build_profile
from jobs.predictor import TabularPredictor
from jobs.profile import ReferenceProfile
from jobs.registry import log_and_register
from serve_apps.api import create_api
from serve_apps.champion import BatchResult, ChampionModel, to_predictions
from serve_apps.fleet import ModelFleet, Routed, predict_by_model
from serve_apps.metrics import IngressMetrics
from serve_apps.replica import Replica
from services.feedback.store import FeedbackStore, PredictionRow
from services.monitoring.live import DriftMonitor, MonitorStatus, VersionReport
from tests.predictors import untrained_predictor

pytestmark = pytest.mark.integration

MODEL = "income"
FEATURES = ["age", "hours_per_week", "sex"]


def _frame(rows: int, seed: int, shifted: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, rows),
            "hours_per_week": rng.normal(40, 8, rows).round(1),
            "sex": rng.choice(["Female", "Male"], rows, p=[0.35, 0.65]),
        }
    )
    if shifted:  # older, longer hours, and mostly the rarer category
        frame["age"] = frame["age"] + 25
        frame["hours_per_week"] = frame["hours_per_week"] * 1.6
        frame["sex"] = rng.choice(["Female", "Male"], rows, p=[0.9, 0.1])
    frame["income"] = np.where(frame["age"] + frame["hours_per_week"] / 2 > 68, ">50K", "<=50K")
    return frame


@pytest.fixture(scope="module")
def trained() -> tuple[TabularPredictor, ReferenceProfile]:
    """A small real predictor and the reference profile its training would log."""
    train, val = _frame(2000, 0), _frame(500, 1)
    config = JobConfig(name=MODEL, data=DataConfig(train_uri="memory", target="income"))
    predictor = untrained_predictor(train, config)
    profile = build_profile(predictor, train, val, calibration=None)
    predictor.profile = profile
    return predictor, profile


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("drift_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


def _settings(dsn: str, tracking_uri: str = "sqlite:///unused.db", **monitor: Any) -> Settings:
    return Settings(
        _env_file=None,
        database={"url": dsn},
        mlflow={"tracking_uri": tracking_uri},
        monitor={"min_rows": 200, "max_rows": 5000, "window_s": 3600, **monitor},
        prediction={"retention_s": 86400},
        accuracy={"min_feedback": 1},
    )


def _rows(predictor: TabularPredictor, frame: pd.DataFrame, version: str, prefix: str) -> list[PredictionRow]:
    """What the inference route records: the request rows and the served outputs."""
    features = frame[FEATURES]
    schema = predictor.schema
    predictions = to_predictions(predictor.raw_outputs(features), schema.task, schema.classes)
    records: list[dict[str, Any]] = features.to_dict(orient="records")
    return [
        PredictionRow(
            f"{prefix}-{i // 10}",
            i % 10,
            MODEL,
            version,
            p["label"],
            p["probability"],
            {key: value.item() if hasattr(value, "item") else value for key, value in row.items()},
            {"probabilities": p["probabilities"]},
        )
        for i, (row, p) in enumerate(zip(records, predictions, strict=True))
    ]


def _gauge(registry: CollectorRegistry, name: str, version: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, {"model": MODEL, "model_version": version, **labels})


def test_each_version_is_judged_published_stored_and_old_rows_expire(dsn, trained):
    predictor, profile = trained
    profiles: dict[tuple[str, str], ReferenceProfile | None] = {
        (MODEL, "1"): profile,
        (MODEL, "2"): profile,
        (MODEL, "3"): None,  # trained before profiles existed
        (MODEL, "4"): profile,
        (MODEL, "5"): profile,
    }
    unreachable = {(MODEL, "5")}

    def load(name: str, version: str) -> ReferenceProfile | None:
        if (name, version) in unreachable:
            raise ConnectionError("registry unreachable")
        return profiles[(name, version)]

    registry = CollectorRegistry()

    async def scenario() -> tuple[list[VersionReport], list[VersionReport], dict[str, Any]]:
        store = FeedbackStore(dsn)
        await store.open()
        try:
            await store.migrate()
            await store.record_predictions(_rows(predictor, _frame(600, 10), "1", "same"))
            await store.record_predictions(_rows(predictor, _frame(600, 11, shifted=True), "2", "shifted"))
            await store.record_predictions(_rows(predictor, _frame(300, 12), "3", "unprofiled"))
            await store.record_predictions(_rows(predictor, _frame(50, 13), "4", "few"))
            await store.record_predictions(_rows(predictor, _frame(300, 14), "5", "flaky"))
            # Rows past the retention, one with feedback (which goes with it).
            await store.record_predictions(_rows(predictor, _frame(30, 15), "1", "old"))
            assert (await store.add_feedback("old-0", 0, ">50K", 3600)).outcome.value == "recorded"
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(
                    "UPDATE predictions SET created_at = now() - interval '2 days' WHERE request_id LIKE 'old-%%'"
                )
            monitor = DriftMonitor(_settings(dsn), store, registry, load_profile=load)
            first = await monitor.refresh()
            stored_first = {v: await store.monitoring_report(MODEL, v) for v in "12345"}
            # Version 4's rows leave the window (not the retention); version 5's registry answers.
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(
                    "UPDATE predictions SET created_at = now() - interval '2 hours' WHERE model_version = '4'"
                )
                counts = await (
                    await conn.execute(
                        "SELECT (SELECT count(*) FROM predictions WHERE request_id LIKE 'old-%%'), "
                        "(SELECT count(*) FROM feedback)"
                    )
                ).fetchone()
            unreachable.clear()
            second = await monitor.refresh()
            stored_second = {v: await store.monitoring_report(MODEL, v) for v in "45"}
            return first, second, {"first": stored_first, "second": stored_second, "old": counts}
        finally:
            await store.close()

    first, second, stored = asyncio.run(scenario())

    # The rows past the retention went, with their feedback.
    assert stored["old"] == (0, 0)

    by_version = {r.model_version: r for r in first}
    assert set(by_version) == {"1", "2", "3", "4"}  # 5: the registry did not answer
    assert by_version["1"].status is MonitorStatus.OK and by_version["2"].status is MonitorStatus.OK
    assert by_version["3"].status is MonitorStatus.NO_REFERENCE_PROFILE
    assert by_version["4"].status is MonitorStatus.TOO_FEW_ROWS and by_version["4"].window_rows == 50

    # Gauges: the shifted traffic drifted, the other did not; accuracy is estimated for both.
    shifted_share = _gauge(registry, "model_drift_share", "2")
    same_share = _gauge(registry, "model_drift_share", "1")
    assert shifted_share is not None and shifted_share >= 0.5
    assert same_share is not None and same_share < 0.5
    for feature in FEATURES:
        assert _gauge(registry, "model_feature_drifted", "2", feature=feature) == 1.0
        assert _gauge(registry, "model_feature_psi", "2", feature=feature) is not None
    assert _gauge(registry, "model_prediction_drift_score", "1") is not None
    for version in ("1", "2"):
        estimated = _gauge(registry, "model_estimated_accuracy", version)
        assert estimated is not None and 0.5 <= estimated <= 1.0
        assert _gauge(registry, "model_estimated_roc_auc", version) is not None
        assert _gauge(registry, "model_monitor_window_rows", version) == 600
        assert _gauge(registry, "model_reference_profile_missing", version) == 0.0
    assert _gauge(registry, "model_reference_accuracy", "1") == profile.reference_accuracy
    # No profile: said so, and no drift figures to alert on.
    assert _gauge(registry, "model_reference_profile_missing", "3") == 1.0
    assert _gauge(registry, "model_drift_share", "3") is None
    assert _gauge(registry, "model_drift_share", "4") is None
    assert registry.get_sample_value("model_drift_share_threshold") == 0.5
    assert registry.get_sample_value("model_estimated_accuracy_max_drop") == 0.05
    cpu = registry.get_sample_value("model_monitor_cpu_seconds_total")
    assert cpu is not None and cpu > 0
    # Versions 1 and 2 in the first round; 1, 2 and 5 in the second.
    assert registry.get_sample_value("model_monitor_windows_total") == 5
    assert registry.get_sample_value("model_monitor_refresh_seconds") is not None

    # The stored reports, in the API's shape.
    reports = stored["first"]
    assert reports["5"] is None
    shifted = reports["2"].report
    assert shifted["status"] == "ok" and shifted["dataset_drift"] is True and shifted["window_rows"] == 600
    assert {f["name"] for f in shifted["features"]} == set(FEATURES)
    assert {f["test"] for f in shifted["features"]} == {"ks", "chi2"}  # 600 rows: the p-value tests
    assert shifted["prediction"]["name"] == "positive" and shifted["min_rows"] == 200
    assert reports["1"].report["dataset_drift"] is False
    assert reports["3"].report["status"] == "no_reference_profile" and reports["3"].report["features"] == []
    assert reports["4"].report["status"] == "too_few_rows"

    # Second round: version 4 left the window (its series go, its report says no rows), version 5
    # is judged now that the registry answers.
    assert {r.model_version for r in second} == {"1", "2", "3", "5"}
    assert _gauge(registry, "model_monitor_window_rows", "4") is None
    assert _gauge(registry, "model_monitor_window_rows", "5") == 300
    idle = stored["second"]["4"].report
    assert idle["status"] == "too_few_rows" and idle["window_rows"] == 0
    assert stored["second"]["5"].report["status"] == "ok"


def test_a_version_recorded_before_outputs_were_is_judged_on_its_features(dsn, trained):
    predictor, profile = trained
    registry = CollectorRegistry()

    async def scenario() -> list[VersionReport]:
        store = FeedbackStore(dsn)
        await store.open()
        try:
            await store.migrate()
            # Rows recorded before outputs were (the column is NULL for them).
            rows = [replace(r, output=None) for r in _rows(predictor, _frame(300, 20), "1", "legacy")]
            await store.record_predictions(rows)
            monitor = DriftMonitor(_settings(dsn), store, registry, load_profile=lambda name, version: profile)
            return await monitor.refresh()
        finally:
            await store.close()

    (result,) = asyncio.run(scenario())
    assert result.status is MonitorStatus.OK and result.report is not None
    assert len(result.report.features) == len(FEATURES)
    assert result.report.estimated_accuracy is None  # no outputs, nothing to estimate from
    assert _gauge(registry, "model_estimated_accuracy", "1") is None
    assert _gauge(registry, "model_drift_share", "1") is not None


def test_with_monitoring_off_only_the_retention_runs(dsn, trained):
    predictor, profile = trained
    registry = CollectorRegistry()

    async def scenario() -> tuple[list[VersionReport], int, Any]:
        store = FeedbackStore(dsn)
        await store.open()
        try:
            await store.migrate()
            await store.record_predictions(_rows(predictor, _frame(300, 40), "1", "recent"))
            await store.record_predictions(_rows(predictor, _frame(20, 41), "1", "old"))
            async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                await conn.execute(
                    "UPDATE predictions SET created_at = now() - interval '2 days' WHERE request_id LIKE 'old-%%'"
                )
                monitor = DriftMonitor(_settings(dsn, enabled=False), store, registry, lambda n, v: profile)
                results = await monitor.refresh()
                left = await (await conn.execute("SELECT count(*) FROM predictions")).fetchone()
            return results, int(left[0]) if left else -1, await store.monitoring_report(MODEL, "1")
        finally:
            await store.close()

    results, left, stored = asyncio.run(scenario())
    assert results == [] and left == 300 and stored is None
    assert _gauge(registry, "model_monitor_window_rows", "1") is None


# The route, in one process ---------------------------------------------------------------------

ADMIN_KEY = "admin-key-for-the-monitoring-test"
OTHER_MODEL_KEY = "key-for-another-model"
FEEDBACK_ONLY_KEY = "key-with-feedback-scope-only"


@pytest.fixture
def registry_uri(tmp_path: Path, trained) -> Iterator[str]:
    """A real MLflow registry (SQLite, local artifacts) holding the predictor as `income` v1, with
    its reference profile, under the champion alias."""
    predictor, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("monitoring", str(tmp_path / "artifacts")))
        client = MlflowClient(uri)
        with mlflow.start_run():
            version = log_and_register(predictor, _frame(50, 2)[[*FEATURES, "income"]], MODEL, client).version
        client.set_registered_model_alias(MODEL, "champion", str(version))
        yield uri
    finally:
        mlflow.set_tracking_uri(previous)


def _key_store() -> KeyStore:
    def principal(key: str, scopes: frozenset[Scope], models: frozenset[str] | None = None) -> tuple[str, Principal]:
        digest = hash_api_key(key)
        return digest, Principal(key_id=key_id_of(digest), name=key, scopes=scopes, models=models)

    return KeyStore(
        dict(
            [
                principal(ADMIN_KEY, frozenset({Scope.ADMIN})),
                principal(OTHER_MODEL_KEY, frozenset({Scope.PREDICT}), frozenset({"other-model"})),
                principal(FEEDBACK_ONLY_KEY, frozenset({Scope.FEEDBACK})),
            ]
        )
    )


def test_the_monitoring_route_shows_the_served_versions_report(dsn, registry_uri, trained):
    _, profile = trained
    settings = _settings(dsn, registry_uri, min_rows=100)

    async def scenario() -> dict[str, Any]:
        def champion(name: str) -> ChampionModel:
            return ChampionModel(name, "champion", registry_uri, poll_interval_s=60)

        fleet = ModelFleet(champion(MODEL), champion, 4)
        await fleet.default.start()

        async def predict_batch(request: Routed) -> BatchResult:
            return predict_by_model([request])[0]

        replica = Replica(settings, fleet, IngressMetrics(), predict_batch, max_rows=1000)
        app = create_api()
        app.state.replica = replica
        app.state.key_store = _key_store()
        app.state.alert_token_store = None
        seen: dict[str, Any] = {}
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as api:
                seen["pending"] = await api.get(f"/v1/models/{MODEL}/monitoring", headers=admin)
                instances = _frame(150, 30)[FEATURES].to_dict(orient="records")
                predicted = await api.post(f"/v1/models/{MODEL}/predict", json={"instances": instances}, headers=admin)
                assert predicted.status_code == 200, predicted.text
                answer = predicted.json()
                label = answer["predictions"][0]["label"]
                feedback = await api.post(
                    "/v1/feedback", json={"request_id": answer["request_id"], "label": label}, headers=admin
                )
                assert feedback.status_code == 201, feedback.text
                recorder = replica.prediction_recorder()
                assert recorder is not None
                await recorder.flush()
                async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
                    cur = await conn.execute(
                        "SELECT output FROM predictions WHERE request_id = %s ORDER BY row_index LIMIT 1",
                        (answer["request_id"],),
                    )
                    seen["output"] = (await cur.fetchone() or [None])[0]
                seen["answer"] = answer
                # The dispatcher's monitor, reading the profile from the registry.
                store = FeedbackStore(dsn)
                monitor = DriftMonitor(settings, store, CollectorRegistry())
                await store.open()
                try:
                    await monitor.refresh()
                finally:
                    await store.close()
                seen["ok"] = await api.get(f"/v1/models/{MODEL}/monitoring", headers=admin)
                seen["unknown"] = await api.get("/v1/models/no-such-model/monitoring", headers=admin)
                seen["other"] = await api.get(
                    f"/v1/models/{MODEL}/monitoring", headers={"Authorization": f"Bearer {OTHER_MODEL_KEY}"}
                )
                seen["scope"] = await api.get(
                    f"/v1/models/{MODEL}/monitoring", headers={"Authorization": f"Bearer {FEEDBACK_ONLY_KEY}"}
                )
                seen["anonymous"] = await api.get(f"/v1/models/{MODEL}/monitoring")
        finally:
            await replica.close()
        return seen

    seen = asyncio.run(scenario())

    pending = seen["pending"]
    assert pending.status_code == 200, pending.text
    body = pending.json()
    assert body["status"] == "pending" and body["computed_at"] is None and body["version"] == "1"
    assert body["features"] == [] and body["estimated_accuracy"] is None and body["min_rows"] == 100

    # The route recorded what the model answered with each row.
    first = seen["answer"]["predictions"][0]
    assert seen["output"] == {"probabilities": first["probabilities"]}

    ok = seen["ok"]
    assert ok.status_code == 200, ok.text
    report = ok.json()
    assert report["model"] == MODEL and report["version"] == "1" and report["status"] == "ok"
    assert report["computed_at"] is not None and report["window_rows"] == 150
    assert {f["name"] for f in report["features"]} == set(FEATURES)
    assert report["dataset_drift"] is False and report["drift_share"] < 0.5
    assert report["prediction"]["name"] == "positive"
    assert report["estimated_accuracy"] is not None and report["estimated_roc_auc"] is not None
    assert report["reference_accuracy"] == profile.reference_accuracy
    assert report["measured_feedback"] == 1 and report["measured_accuracy"] == 1.0

    # The same answers as the other model routes for a model the key may not see, or no key.
    assert seen["unknown"].status_code == 404 and seen["unknown"].json()["error"]["code"] == "model_not_found"
    assert seen["other"].status_code == 404 and seen["other"].json()["error"]["code"] == "model_not_found"
    assert seen["scope"].status_code == 403 and seen["scope"].json()["error"]["code"] == "missing_scope"
    assert seen["anonymous"].status_code == 401
