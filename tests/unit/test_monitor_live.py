"""The live monitor's report and gauges, from a drift report: the stored JSON is what the API
serves, and a version that leaves the window takes its series (and so its alerts) with it."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry

from core.settings import MonitorSettings
from jobs.pyfunc import PREDICTOR_ARTIFACT
from serve_apps.schemas import ModelMonitoring
from services.monitoring import live
from services.monitoring.drift import DriftReport, FeatureDrift
from services.monitoring.live import DriftGauges, MonitorStatus, VersionReport, idle_report, report_json

MONITOR = MonitorSettings()


def _report(share: float) -> DriftReport:
    age = FeatureDrift("age", "numeric", "ks", 0.001, 0.05, True, 0.4, 300)
    sex = FeatureDrift("sex", "categorical", "chi2", 0.6, 0.05, False, 0.01, 298)
    positive = FeatureDrift("positive", "numeric", "ks", 0.2, 0.05, False, 0.02, 300)
    return DriftReport([age, sex], positive, share, share >= 0.5, 0.83, 0.9, 0.86, 300)


def _served(stored: dict[str, object]) -> ModelMonitoring:
    """The route's answer from a stored report."""
    return ModelMonitoring.model_validate(
        {**stored, "computed_at": datetime.now(UTC), "measured_accuracy": None, "measured_feedback": 0}
    )


def test_the_stored_report_is_the_apis_answer():
    ok = VersionReport("adult", "3", MonitorStatus.OK, 300, _report(0.5), 0.86)
    served = _served(report_json(ok, MONITOR))
    assert served.status == "ok" and served.dataset_drift and served.drift_share == 0.5
    assert [f.name for f in served.features] == ["age", "sex"] and served.features[0].drifted
    assert served.prediction is not None and served.prediction.name == "positive"
    assert served.estimated_accuracy == 0.83 and served.reference_accuracy == 0.86
    assert served.min_rows == MONITOR.min_rows and served.drift_share_threshold == MONITOR.drift_share_threshold


@pytest.mark.parametrize(
    "result",
    [
        VersionReport("adult", "3", MonitorStatus.NO_REFERENCE_PROFILE, 250),
        VersionReport("adult", "3", MonitorStatus.TOO_FEW_ROWS, 12, None, 0.86),
        idle_report("adult", "3"),
    ],
)
def test_a_version_not_judged_has_no_drift_figures(result):
    served = _served(report_json(result, MONITOR))
    assert served.status == result.status.value and served.window_rows == result.window_rows
    assert served.drift_share is None and served.features == [] and served.prediction is None
    assert served.estimated_accuracy is None and not served.dataset_drift
    assert served.reference_accuracy == result.reference_accuracy


def test_gauges_of_versions_no_longer_reported_are_removed():
    registry = CollectorRegistry()
    gauges = DriftGauges(registry)
    old = VersionReport("adult", "2", MonitorStatus.OK, 300, _report(0.5), 0.86)
    new = VersionReport("adult", "3", MonitorStatus.NO_REFERENCE_PROFILE, 250)
    gauges.publish([old, new])
    labels = {"model": "adult", "model_version": "2"}
    assert registry.get_sample_value("model_drift_share", labels) == 0.5
    assert registry.get_sample_value("model_feature_drifted", {**labels, "feature": "age"}) == 1.0
    assert registry.get_sample_value("model_prediction_drifted", labels) == 0.0
    assert registry.get_sample_value("model_estimated_roc_auc", labels) == 0.9
    assert registry.get_sample_value("model_reference_profile_missing", {**labels, "model_version": "3"}) == 1.0
    gauges.publish([new])
    assert registry.get_sample_value("model_drift_share", labels) is None
    assert registry.get_sample_value("model_feature_drifted", {**labels, "feature": "age"}) is None
    assert registry.get_sample_value("model_monitor_window_rows", {**labels, "model_version": "3"}) == 250


def test_the_profile_is_read_from_the_artifact_the_registry_logs():
    # live.py names it itself to keep torch (jobs.pyfunc's import) out of the dispatcher.
    assert live.PREDICTOR_ARTIFACT == PREDICTOR_ARTIFACT
