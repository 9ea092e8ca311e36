"""Drift and estimated accuracy of the served version, as `/v1/models/{name}/monitoring` reports
them: a summary against the thresholds, and one table row per feature (and the prediction).

Pure shaping of the API's JSON; the figures are the monitor's, this only words them.
"""

from __future__ import annotations

from typing import Any

FEATURE_COLUMNS = ["feature", "kind", "test", "score", "threshold", "drifted", "PSI", "rows"]
PREDICTION_ROW = "(prediction)"

# Why there are no figures yet, by the report's status; "ok" has figures.
_STATUS_TEXT = {
    "pending": "The monitor has not judged this version yet; it does on its next refresh.",
    "too_few_rows": (
        "Too few recorded predictions in the window to judge drift: {window_rows} of the {min_rows} needed."
    ),
    "no_reference_profile": (
        "This version was trained without a reference profile (before drift monitoring), so its "
        "traffic cannot be compared with its training data; a retrained version has one."
    ),
}


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and not isinstance(value, bool) else "n/a"


def _time(value: Any) -> str:
    # ISO 8601 from the API; seconds are precise enough here.
    return str(value)[:19].replace("T", " ") + " UTC" if value else "never"


def _drift_line(report: dict[str, Any]) -> str:
    share, threshold = report.get("drift_share"), report.get("drift_share_threshold")
    verdict = "**dataset drift**" if report.get("dataset_drift") else "no dataset drift"
    return (
        f"| drift share (features drifted) | {_number(share, 2)} | alerts at >= {_number(threshold, 2)} · {verdict} |"
    )


def _accuracy_lines(report: dict[str, Any]) -> list[str]:
    measured = report.get("measured_accuracy")
    labels = report.get("measured_feedback")
    lines = [
        f"| estimated accuracy (from the predictions' confidence) | {_number(report.get('estimated_accuracy'))} | |",
        f"| reference accuracy (validation, at training) | {_number(report.get('reference_accuracy'))} | |",
        f"| measured accuracy (labelled feedback) | {_number(measured)} | {labels or 0} labels |",
    ]
    if report.get("estimated_roc_auc") is not None:
        lines.append(f"| estimated ROC AUC | {_number(report['estimated_roc_auc'])} | |")
    return lines


def monitoring_markdown(report: dict[str, Any]) -> str:
    """The report's status and headline figures against their thresholds."""
    status = str(report.get("status") or "pending")
    head = [
        f"#### Drift and estimated accuracy: {report.get('model')} v{report.get('version')}",
        f"Status **{status}** · judged {_time(report.get('computed_at'))} · {report.get('window_rows') or 0} "
        f"predictions in the window (at least {report.get('min_rows') or '?'} needed)",
    ]
    if status != "ok":
        text = _STATUS_TEXT.get(status, f"No figures (status {status}).")
        head.append(text.format(window_rows=report.get("window_rows") or 0, min_rows=report.get("min_rows") or "?"))
    table = ["| | value | |", "| --- | --- | --- |"]
    if report.get("drift_share") is not None:
        table.append(_drift_line(report))
    table += _accuracy_lines(report)
    return "\n\n".join([*head, "\n".join(table)])


def _row(name: str, feature: dict[str, Any]) -> list[str]:
    return [
        name,
        str(feature.get("kind") or ""),
        str(feature.get("test") or ""),
        _number(feature.get("score"), 4),
        _number(feature.get("threshold"), 4),
        "yes" if feature.get("drifted") else "no",
        _number(feature.get("psi"), 4),
        str(feature.get("window_rows") if feature.get("window_rows") is not None else ""),
    ]


def feature_rows(report: dict[str, Any]) -> list[list[str]]:
    """One row per input feature, drifted ones first, then the prediction's own drift."""
    features = [f for f in report.get("features") or [] if isinstance(f, dict)]
    ordered = sorted(features, key=lambda f: (not f.get("drifted"), str(f.get("name"))))
    rows = [_row(str(f.get("name")), f) for f in ordered]
    prediction = report.get("prediction")
    if isinstance(prediction, dict):
        rows.append(_row(PREDICTION_ROW, prediction))
    return rows


def unavailable_markdown(message: str) -> str:
    """The monitoring part of the page when the API could not give it; the card still shows."""
    return f"#### Drift and estimated accuracy\n\n_Monitoring unavailable: {message}_"
