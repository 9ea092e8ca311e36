"""Drift and estimated accuracy of every served model version, from its recorded predictions.

Runs in the dispatcher's event loop next to the live accuracy (services/monitoring/accuracy.py),
never on a replica's request path. Each refresh it

1. deletes the predictions past their retention (`PREDICTION_RETENTION_S`; their feedback
   cascades), in bounded batches so that a backlog never holds a long transaction;
2. lists the versions that made predictions in the last `MONITOR_WINDOW_S`;
3. reads each one's most recent `MONITOR_MAX_ROWS` rows (request features and model outputs);
4. reads the version's reference profile from the registry, once per version;
5. judges the window against it (services/monitoring/drift.py) in a worker thread, once the window
   holds `MONITOR_MIN_ROWS` rows: the statistics cost CPU that the loop's other work (heartbeats,
   job messages) must not wait for;
6. publishes the figures as Prometheus gauges (the alerts ModelDataDrift and
   ModelEstimatedAccuracyLow read them) and
7. stores the report per version in `model_monitoring`, which GET /v1/models/{name}/monitoring shows.

With MONITOR_ENABLED=false only the first step runs: the retention is not a monitoring choice.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from core.settings import MonitorSettings, Settings
from jobs.profile import PROFILE_FILE, ReferenceProfile
from services.feedback.store import FeedbackStore, WindowRows, WindowVersion
from services.monitoring.drift import DriftReport, DriftThresholds, FeatureDrift, judge
from services.monitoring.loop import refresh_forever

log = logging.getLogger(__name__)

# Retention deletes: rows per statement, statements per refresh. A refresh deletes up to a million
# rows, far more than any served traffic adds in a refresh, so a backlog clears in a few rounds.
DELETE_BATCH_ROWS = 10_000
DELETE_MAX_BATCHES = 100
# The pyfunc artifact that holds the predictor directory (jobs/pyfunc.py PREDICTOR_ARTIFACT; that
# module imports torch, which the dispatcher has no other use for).
PREDICTOR_ARTIFACT = "predictor"

# (model name, version) -> the version's reference profile, None when it was trained without one.
# Blocking (run in a worker thread); raises when the registry cannot say.
ProfileLoader = Callable[[str, str], ReferenceProfile | None]
VersionKey = tuple[str, str]


class MonitorStatus(enum.StrEnum):
    OK = "ok"
    PENDING = "pending"  # nothing computed yet for the version (the API's answer, never stored)
    TOO_FEW_ROWS = "too_few_rows"
    NO_REFERENCE_PROFILE = "no_reference_profile"


def registry_profile_loader(tracking_uri: str) -> ProfileLoader:
    """Reads a version's reference profile from the MLflow registry: only its MLmodel file and the
    profile, not the weights."""

    # MLflow draws progress bars on stderr for every download; in the dispatcher's JSON log they
    # are noise (read when each download starts).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    def load(name: str, version: str) -> ReferenceProfile | None:
        import mlflow.artifacts
        import yaml
        from mlflow.tracking import MlflowClient

        root = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
        with tempfile.TemporaryDirectory() as tmp:
            mlmodel = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{root}/MLmodel", dst_path=tmp, tracking_uri=tracking_uri
            )
            meta = yaml.safe_load(Path(mlmodel).read_text(encoding="utf-8"))
            artifacts = meta.get("flavors", {}).get("python_function", {}).get("artifacts", {})
            if PREDICTOR_ARTIFACT not in artifacts:
                return None
            predictor = f"{root}/{artifacts[PREDICTOR_ARTIFACT]['path']}"
            listed = mlflow.artifacts.list_artifacts(artifact_uri=predictor, tracking_uri=tracking_uri)
            if not any(Path(f.path).name == PROFILE_FILE for f in listed):
                return None  # trained before profiles existed
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{predictor}/{PROFILE_FILE}", dst_path=tmp, tracking_uri=tracking_uri
            )
            return ReferenceProfile.model_validate_json(Path(path).read_text(encoding="utf-8"))

    return load


def thresholds_of(monitor: MonitorSettings) -> DriftThresholds:
    return DriftThresholds(
        small_sample_rows=monitor.small_sample_rows,
        p_value=monitor.p_value,
        wasserstein=monitor.wasserstein_threshold,
        jensen_shannon=monitor.jensen_shannon_threshold,
        drift_share=monitor.drift_share_threshold,
    )


@dataclass(frozen=True)
class VersionReport:
    """What one refresh found for one version: the gauges and the stored report come from it."""

    model_name: str
    model_version: str
    status: MonitorStatus
    window_rows: int  # rows judged: the most recent `max_rows` of the window at most
    report: DriftReport | None = None  # only with status ok
    reference_accuracy: float | None = None  # from the profile, whenever there is one

    @property
    def key(self) -> VersionKey:
        return (self.model_name, self.model_version)


def feature_json(drift: FeatureDrift) -> dict[str, Any]:
    return {
        "name": drift.name,
        "kind": drift.kind,
        "test": drift.test,
        "score": drift.score,
        "threshold": drift.threshold,
        "drifted": drift.drifted,
        "psi": drift.psi,
        "window_rows": drift.window_rows,
    }


def report_json(result: VersionReport, monitor: MonitorSettings) -> dict[str, Any]:
    """The stored report: GET /v1/models/{name}/monitoring's body less `computed_at` (the row's
    column) and the measured accuracy (the route reads the feedback)."""
    report = result.report
    return {
        "model": result.model_name,
        "version": result.model_version,
        "status": result.status.value,
        "window_rows": result.window_rows,
        "min_rows": monitor.min_rows,
        "drift_share": report.drift_share if report else None,
        "drift_share_threshold": monitor.drift_share_threshold,
        "dataset_drift": report.dataset_drift if report else False,
        "features": [feature_json(f) for f in report.features] if report else [],
        "prediction": feature_json(report.prediction) if report and report.prediction else None,
        "estimated_accuracy": report.estimated_accuracy if report else None,
        "estimated_roc_auc": report.estimated_roc_auc if report else None,
        "reference_accuracy": report.reference_accuracy if report else result.reference_accuracy,
    }


def idle_report(model_name: str, model_version: str) -> VersionReport:
    """A version whose predictions all left the window: nothing left to judge."""
    return VersionReport(model_name, model_version, MonitorStatus.TOO_FEW_ROWS, 0)


def judge_window(
    profile: ReferenceProfile, document: str, thresholds: DriftThresholds
) -> tuple[DriftReport, int, float]:
    """Parse the window's rows and judge them: (report, rows judged, CPU seconds spent). Runs in
    a worker thread; its CPU time is the monitor's cost per version."""
    started = time.thread_time()
    rows = WindowRows.parse(document)
    report = judge(profile, rows.features, rows.outputs, thresholds)
    return report, len(rows.features), time.thread_time() - started


class DriftGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        version = ["model", "model_version"]
        feature = [*version, "feature"]

        def gauge(name: str, documentation: str, labels: list[str] | None = None) -> Gauge:
            return Gauge(name, documentation, labels or [], registry=registry)

        self.feature_score = gauge(
            "model_feature_drift_score",
            "Drift statistic of a feature against the reference: p-value (ks, chi2) or distance "
            "(wasserstein, jensen_shannon)",
            feature,
        )
        self.feature_drifted = gauge("model_feature_drifted", "1 when the feature drifted, else 0", feature)
        self.feature_psi = gauge("model_feature_psi", "Population stability index of the feature", feature)
        self.prediction_score = gauge(
            "model_prediction_drift_score", "Drift statistic of the model's outputs against the reference", version
        )
        self.prediction_drifted = gauge("model_prediction_drifted", "1 when the outputs drifted, else 0", version)
        self.drift_share = gauge("model_drift_share", "Share of the features that drifted", version)
        self.estimated_accuracy = gauge(
            "model_estimated_accuracy", "Accuracy expected from the calibrated probabilities of the window", version
        )
        self.estimated_roc_auc = gauge(
            "model_estimated_roc_auc", "ROC AUC expected from the calibrated probabilities (binary)", version
        )
        self.reference_accuracy = gauge(
            "model_reference_accuracy", "Accuracy of the version on its validation split at training", version
        )
        self.window_rows = gauge("model_monitor_window_rows", "Recorded predictions judged in the window", version)
        self.profile_missing = gauge(
            "model_reference_profile_missing", "1 when the version was trained without a reference profile", version
        )
        self.drift_share_threshold = gauge(
            "model_drift_share_threshold", "Drift share at or above which the data drift alert fires"
        )
        self.estimated_accuracy_max_drop = gauge(
            "model_estimated_accuracy_max_drop",
            "Drop of the estimated accuracy below the reference beyond which the alert fires",
        )
        self.cpu_seconds = Counter(
            "model_monitor_cpu_seconds", "CPU time spent judging windows for drift", registry=registry
        )
        self.windows = Counter("model_monitor_windows", "Windows judged for drift", registry=registry)
        self.refresh_seconds = gauge("model_monitor_refresh_seconds", "Wall time of the last monitor refresh")
        self._per_version = [
            self.feature_score,
            self.feature_drifted,
            self.feature_psi,
            self.prediction_score,
            self.prediction_drifted,
            self.drift_share,
            self.estimated_accuracy,
            self.estimated_roc_auc,
            self.reference_accuracy,
            self.window_rows,
            self.profile_missing,
        ]

    def publish(self, results: list[VersionReport]) -> None:
        # Versions no longer in the window (or no longer judged) disappear, so their alerts resolve.
        for metric in self._per_version:
            metric.clear()
        for result in results:
            labels = (result.model_name, result.model_version)
            self.window_rows.labels(*labels).set(result.window_rows)
            self.profile_missing.labels(*labels).set(int(result.status is MonitorStatus.NO_REFERENCE_PROFILE))
            if result.reference_accuracy is not None:
                self.reference_accuracy.labels(*labels).set(result.reference_accuracy)
            report = result.report
            if report is None:
                continue
            for f in report.features:
                self.feature_score.labels(*labels, f.name).set(f.score)
                self.feature_drifted.labels(*labels, f.name).set(int(f.drifted))
                self.feature_psi.labels(*labels, f.name).set(f.psi)
            if report.prediction is not None:
                self.prediction_score.labels(*labels).set(report.prediction.score)
                self.prediction_drifted.labels(*labels).set(int(report.prediction.drifted))
            self.drift_share.labels(*labels).set(report.drift_share)
            if report.estimated_accuracy is not None:
                self.estimated_accuracy.labels(*labels).set(report.estimated_accuracy)
            if report.estimated_roc_auc is not None:
                self.estimated_roc_auc.labels(*labels).set(report.estimated_roc_auc)


class DriftMonitor:
    def __init__(
        self,
        settings: Settings,
        store: FeedbackStore,
        registry: CollectorRegistry,
        load_profile: ProfileLoader | None = None,
    ) -> None:
        self._settings = settings
        self._monitor = settings.monitor
        self._thresholds = thresholds_of(settings.monitor)
        self.store = store
        self._load_profile = load_profile or registry_profile_loader(settings.mlflow.tracking_uri)
        self.gauges = DriftGauges(registry)
        self.gauges.drift_share_threshold.set(self._monitor.drift_share_threshold)
        self.gauges.estimated_accuracy_max_drop.set(self._monitor.estimated_accuracy_max_drop)
        self._profiles: dict[VersionKey, ReferenceProfile | None] = {}
        self._published: dict[VersionKey, VersionReport] = {}

    async def refresh(self) -> list[VersionReport]:
        """One round: retention, then every version of the window judged, published and stored."""
        started = time.perf_counter()
        deleted = await self.store.delete_predictions_older_than(
            self._settings.prediction.retention_s, DELETE_BATCH_ROWS, DELETE_MAX_BATCHES
        )
        if deleted:
            log.info("deleted %d predictions past their retention", deleted)
        if not self._monitor.enabled:  # MONITOR_ENABLED=false: the retention alone
            return []
        versions = await self.store.window_versions(self._monitor.window_s)
        in_window = {(v.model_name, v.model_version) for v in versions}
        # Profiles of versions gone from the window are read again should they come back.
        self._profiles = {key: profile for key, profile in self._profiles.items() if key in in_window}
        results: dict[VersionKey, VersionReport] = {}
        for version in versions:
            key = (version.model_name, version.model_version)
            try:
                result = await self._judge(version)
                await self.store.save_monitoring(*key, report_json(result, self._monitor))
            except Exception as exc:
                # Its last figures stay published (an alert in progress keeps its clock) and the
                # next round tries again.
                log.warning("monitoring of %s version %s not refreshed: %s: %s", *key, type(exc).__name__, exc)
                previous = self._published.get(key)
                if previous is not None:
                    results[key] = previous
                continue
            results[key] = result
        self._published = results
        self.gauges.publish(list(results.values()))
        for key in await self.store.monitored_with_rows():
            if key not in in_window:
                await self.store.save_monitoring(*key, report_json(idle_report(*key), self._monitor))
        self.gauges.refresh_seconds.set(time.perf_counter() - started)
        return list(results.values())

    async def _judge(self, version: WindowVersion) -> VersionReport:
        name, number = version.model_name, version.model_version
        rows = min(version.rows, self._monitor.max_rows)
        key = (name, number)
        if key not in self._profiles:
            self._profiles[key] = await asyncio.to_thread(self._load_profile, name, number)
        profile = self._profiles[key]
        if profile is None:
            return VersionReport(name, number, MonitorStatus.NO_REFERENCE_PROFILE, rows)
        if rows < self._monitor.min_rows:
            return VersionReport(name, number, MonitorStatus.TOO_FEW_ROWS, rows, None, profile.reference_accuracy)
        document = await self.store.window_document(name, number, self._monitor.window_s, self._monitor.max_rows)
        report, judged, cpu_s = await asyncio.to_thread(judge_window, profile, document, self._thresholds)
        self.gauges.cpu_seconds.inc(cpu_s)
        self.gauges.windows.inc()
        return VersionReport(name, number, MonitorStatus.OK, judged, report, profile.reference_accuracy)

    async def run(self) -> None:
        await refresh_forever(self.store, self.refresh, self._monitor.refresh_s, "model monitoring")
