"""The served model's card: identity, test metrics, training curves, promotion history.

Pure shaping of what `/v1/models/current` and MLflow's REST API return.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pandas as pd

CURVE_COLUMNS = ["epoch", "value", "metric"]
# Logged once per run, or per epoch but not a learning curve (throughput, timing, schedule).
_NOT_CURVES = {"epochs_run", "lr", "epoch_time_s", "train_rows_per_s", "best_val_loss", "tune.trials"}
_NOT_CURVE_PREFIXES = ("test_", "promotion_", "system/")
PROMOTION_COLUMNS = [
    "version",
    "aliases",
    "decision",
    "metric",
    "candidate score",
    "champion score",
    "against version",
    "reason",
    "rollout",
    "registered (UTC)",
]
# The rollout service's and a rollback's tags on a version (jobs/rollout.py; a test keeps them
# equal): named here, so that the UI does not import the ML library for a few strings.
ROLLOUT_STATE_TAG = "rollout.state"
ROLLOUT_REASON_TAG = "rollout.reason"
ROLLED_BACK_TAG = "rollback.rolled_back"
RESTORED_FROM_TAG = "rollback.restored_from"


def curve_keys(run: dict[str, Any]) -> list[str]:
    """Metric keys of a run worth plotting per epoch, from its latest values."""
    keys = {str(m.get("key")) for m in run.get("data", {}).get("metrics", [])}
    return sorted(k for k in keys if k not in _NOT_CURVES and not k.startswith(_NOT_CURVE_PREFIXES))


def curves_frame(histories: dict[str, list[dict[str, Any]]]) -> pd.DataFrame:
    """Long form (epoch, value, metric) for a line plot coloured by metric. MLflow keeps every
    logged value; a step logged twice (a resumed attempt) keeps its last value."""
    rows: dict[tuple[str, int], float] = {}
    for key, points in histories.items():
        for point in sorted(points, key=lambda p: int(p.get("timestamp", 0))):
            rows[(key, int(point.get("step", 0)))] = float(point["value"])
    frame = pd.DataFrame([(step, value, key) for (key, step), value in rows.items()], columns=pd.Index(CURVE_COLUMNS))
    return frame.sort_values(["metric", "epoch"], ignore_index=True)


def split_curves(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Losses and scores (accuracy, ...) on separate plots: their scales differ."""
    is_loss = frame["metric"].str.contains("loss")
    return frame[is_loss].reset_index(drop=True), frame[~is_loss].reset_index(drop=True)


def curves_by_metric(frame: pd.DataFrame) -> dict[str, list[list[float]]]:
    """{metric: [[epoch, value], ...]}: the curves as plain data for API clients."""
    return {
        str(metric): [[float(e), float(v)] for e, v in zip(group["epoch"], group["value"], strict=True)]
        for metric, group in frame.groupby("metric", sort=True)
    }


def _tags(version: dict[str, Any]) -> dict[str, str]:
    return {str(t.get("key")): str(t.get("value", "")) for t in version.get("tags", [])}


def _utc(milliseconds: Any) -> str:
    try:
        return datetime.fromtimestamp(int(milliseconds) / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError):
        return ""


def rollout_outcome(tags: dict[str, str]) -> str:
    """What the rollout service decided on a version (shadow or canary), and whether a rollback
    moved the champion away from it or back to it; empty for a version it never handled."""
    parts = []
    if tags.get(ROLLOUT_STATE_TAG):
        reason = tags.get(ROLLOUT_REASON_TAG)
        parts.append(f"{tags[ROLLOUT_STATE_TAG]}: {reason}" if reason else tags[ROLLOUT_STATE_TAG])
    if tags.get(ROLLED_BACK_TAG):
        try:
            rollback = json.loads(tags[ROLLED_BACK_TAG])
        except ValueError:
            rollback = None
        if isinstance(rollback, dict):
            parts.append(f"rolled back to v{rollback.get('to')} by {rollback.get('by')}: {rollback.get('reason')}")
        else:
            parts.append("rolled back")
    if tags.get(RESTORED_FROM_TAG):
        parts.append(f"restored by a rollback from v{tags[RESTORED_FROM_TAG]}")
    return " · ".join(parts)


def promotion_history(versions: list[dict[str, Any]], aliases: dict[str, str]) -> list[dict[str, Any]]:
    """One entry per registered version, newest first, with the gate's decision tags (written by
    jobs/promote.py); a version the gate never saw says so."""
    history = []
    for version in sorted(versions, key=lambda v: int(v.get("version", 0)), reverse=True):
        tags = _tags(version)
        number = str(version.get("version"))
        history.append(
            {
                "version": number,
                "aliases": aliases.get(number, ""),
                "decision": tags.get("promotion.decision", "not gated"),
                "metric": tags.get("promotion.metric", ""),
                "candidate score": tags.get("promotion.candidate_score", ""),
                "champion score": tags.get("promotion.champion_score", ""),
                "against version": tags.get("promotion.champion_version", ""),
                "reason": tags.get("promotion.reason", ""),
                "rollout": rollout_outcome(tags),
                "registered (UTC)": _utc(version.get("creation_timestamp")),
            }
        )
    return history


def promotion_rows(history: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(entry[c]) for c in PROMOTION_COLUMNS] for entry in history]


def card_markdown(current: dict[str, Any]) -> str:
    metrics = current.get("metrics") or {}
    lines = [
        f"### {current.get('name')} v{current.get('version')} (alias `{current.get('alias')}`)",
        f"Run `{current.get('run_id')}` · task {current.get('task')} · target `{current.get('target')}`"
        f" · serving since {_utc(float(current.get('loaded_at') or 0) * 1000)} UTC",
    ]
    if metrics:
        lines += ["", "| test metric | value |", "| --- | --- |"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(metrics.items())]
    else:
        lines += ["", "No test metrics were logged for this run."]
    return "\n".join(lines)
