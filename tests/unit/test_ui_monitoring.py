"""The Model tab's drift part: the monitor's report as the page words it."""

from __future__ import annotations

from typing import Any

from ui.monitoring import FEATURE_COLUMNS, PREDICTION_ROW, feature_rows, monitoring_markdown, unavailable_markdown


def _feature(name: str, drifted: bool, score: float = 0.2) -> dict[str, Any]:
    return {"name": name, "kind": "numeric", "test": "ks", "score": score, "threshold": 0.05, "drifted": drifted,
            "psi": 0.123456, "window_rows": 250}  # fmt: skip


def _report(**changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": "adult-income", "version": "3", "status": "ok", "computed_at": "2026-01-01T10:00:00.5+00:00",
        "window_rows": 250, "min_rows": 200, "drift_share": 0.25, "drift_share_threshold": 0.5,
        "dataset_drift": False, "features": [_feature("age", False), _feature("hours", True, 0.001)],
        "prediction": None, "estimated_accuracy": 0.84, "estimated_roc_auc": None, "reference_accuracy": 0.86,
        "measured_accuracy": 0.8, "measured_feedback": 12,
    }  # fmt: skip
    return {**report, **changes}


def test_a_judged_version_shows_its_figures_against_the_thresholds():
    text = monitoring_markdown(_report())
    assert text.startswith("#### Drift and estimated accuracy: adult-income v3")
    assert "Status **ok** · judged 2026-01-01 10:00:00 UTC · 250 predictions in the window (at least 200" in text
    assert "| drift share (features drifted) | 0.25 | alerts at >= 0.50 · no dataset drift |" in text
    assert "| estimated accuracy (from the predictions' confidence) | 0.840 | |" in text
    assert "| reference accuracy (validation, at training) | 0.860 | |" in text
    assert "| measured accuracy (labelled feedback) | 0.800 | 12 labels |" in text
    assert "ROC AUC" not in text  # only binary classifiers have one
    assert "| estimated ROC AUC | 0.910 | |" in monitoring_markdown(_report(estimated_roc_auc=0.91))
    assert "**dataset drift**" in monitoring_markdown(_report(drift_share=0.5, dataset_drift=True))


def test_drifted_features_come_first_and_the_prediction_last():
    rows = feature_rows(_report(prediction={**_feature("prediction", False), "kind": "categorical"}))
    assert all(len(row) == len(FEATURE_COLUMNS) for row in rows)
    assert [row[0] for row in rows] == ["hours", "age", PREDICTION_ROW]
    assert rows[0] == ["hours", "numeric", "ks", "0.0010", "0.0500", "yes", "0.1235", "250"]
    assert rows[2][1] == "categorical"


def test_a_version_without_figures_says_why():
    pending = monitoring_markdown(_report(status="pending", computed_at=None, drift_share=None, features=[],
                                          estimated_accuracy=None, reference_accuracy=None, measured_accuracy=None,
                                          measured_feedback=0, window_rows=0))  # fmt: skip
    assert "Status **pending** · judged never" in pending and "has not judged this version yet" in pending
    assert "drift share" not in pending and "| estimated accuracy (from the predictions' confidence) | n/a |" in pending
    few = monitoring_markdown(_report(status="too_few_rows", window_rows=40, drift_share=None))
    assert "40 of the 200 needed" in few
    old = monitoring_markdown(_report(status="no_reference_profile", drift_share=None))
    assert "without a reference profile" in old
    assert feature_rows(_report(features=[], prediction=None)) == []


def test_an_unavailable_report_is_one_clear_line():
    assert unavailable_markdown("Not found (404): no route") == (
        "#### Drift and estimated accuracy\n\n_Monitoring unavailable: Not found (404): no route_"
    )
