"""The model card: which metrics are curves, their shape, the promotion history."""

import json
from typing import Any

from jobs import rollout
from ui import card
from ui.card import (
    PROMOTION_COLUMNS,
    card_markdown,
    curve_keys,
    curves_by_metric,
    curves_frame,
    promotion_history,
    promotion_rows,
    rollout_outcome,
    split_curves,
)


def _run(*keys: str):
    return {"data": {"metrics": [{"key": k, "value": 1.0} for k in keys]}}


def test_curve_keys_leave_out_final_scores_and_bookkeeping():
    run = _run("train_loss", "val_loss", "val_accuracy", "test_accuracy", "promotion_candidate_score", "lr",
               "epochs_run", "train_rows_per_s", "epoch_time_s", "best_val_loss")  # fmt: skip
    assert curve_keys(run) == ["train_loss", "val_accuracy", "val_loss"]
    assert curve_keys({}) == []


def test_curves_keep_the_last_value_logged_for_an_epoch():
    histories = {
        "val_loss": [
            {"step": 1, "value": 0.4, "timestamp": 20},
            {"step": 0, "value": 0.5, "timestamp": 10},
            {"step": 1, "value": 0.35, "timestamp": 30},  # a resumed attempt logged epoch 1 again
        ],
        "val_accuracy": [{"step": 0, "value": 0.8, "timestamp": 10}],
    }
    frame = curves_frame(histories)
    assert list(frame.columns) == ["epoch", "value", "metric"]
    assert frame.to_dict("records") == [
        {"epoch": 0, "value": 0.8, "metric": "val_accuracy"},
        {"epoch": 0, "value": 0.5, "metric": "val_loss"},
        {"epoch": 1, "value": 0.35, "metric": "val_loss"},
    ]
    losses, scores = split_curves(frame)
    assert set(losses["metric"]) == {"val_loss"} and set(scores["metric"]) == {"val_accuracy"}
    assert curves_by_metric(frame) == {"val_accuracy": [[0.0, 0.8]], "val_loss": [[0.0, 0.5], [1.0, 0.35]]}


def test_no_curves():
    frame = curves_frame({})
    assert frame.empty and list(frame.columns) == ["epoch", "value", "metric"]
    assert curves_by_metric(frame) == {}
    losses, scores = split_curves(frame)
    assert losses.empty and scores.empty


def test_promotion_history_newest_first_with_the_gate_s_tags():
    versions = [
        {"version": "9", "creation_timestamp": 1_700_000_000_000, "tags": []},
        {
            "version": "10",
            "creation_timestamp": 1_700_000_100_000,
            "tags": [
                {"key": "promotion.decision", "value": "rejected"},
                {"key": "promotion.metric", "value": "accuracy"},
                {"key": "promotion.candidate_score", "value": "0.800000"},
                {"key": "promotion.champion_score", "value": "0.850000"},
                {"key": "promotion.champion_version", "value": "8"},
                {"key": "promotion.reason", "value": "accuracy 0.8 does not beat champion 0.85 by more than 0.0"},
            ],
        },
        {
            "version": "8",
            "creation_timestamp": 1_600_000_000_000,
            "tags": [{"key": "promotion.decision", "value": "promoted"}],
        },
    ]
    history = promotion_history(versions, {"8": "champion"})
    assert [h["version"] for h in history] == ["10", "9", "8"]
    assert history[0]["decision"] == "rejected" and history[0]["against version"] == "8"
    assert history[0]["registered (UTC)"] == "2023-11-14 22:15:00"
    assert history[1]["decision"] == "not gated"
    assert history[2]["aliases"] == "champion"
    rows = promotion_rows(history)
    assert len(rows[0]) == len(PROMOTION_COLUMNS) and rows[0][3] == "accuracy"


def test_promotion_history_shows_the_rollout_decisions_and_rollbacks():
    assert (card.ROLLOUT_STATE_TAG, card.ROLLOUT_REASON_TAG, card.ROLLED_BACK_TAG, card.RESTORED_FROM_TAG) == (
        rollout.STATE_TAG, rollout.DECISION_REASON_TAG, rollout.ROLLED_BACK_TAG, rollout.RESTORED_FROM_TAG
    )  # fmt: skip
    rolled_back = {"to": "4", "reason": "live accuracy 0.71 below 0.83", "at": "2026-01-01T12:00:00+00:00",
                   "by": "rollout service", "figures": {}}  # fmt: skip
    versions: list[dict[str, Any]] = [
        {"version": "6", "tags": [{"key": "rollout.state", "value": "rejected"},
                                  {"key": "rollout.reason", "value": "agreement 0.41 < 0.9"}]},
        {"version": "5", "tags": [{"key": "rollout.state", "value": "promoted"},
                                  {"key": "rollback.rolled_back", "value": json.dumps(rolled_back)}]},
        {"version": "4", "tags": [{"key": "rollback.restored_from", "value": "5"}]},
        {"version": "3", "tags": []},
    ]  # fmt: skip
    history = promotion_history(versions, {"4": "champion", "6": ""})
    assert [h["rollout"] for h in history] == [
        "rejected: agreement 0.41 < 0.9",
        "promoted · rolled back to v4 by rollout service: live accuracy 0.71 below 0.83",
        "restored by a rollback from v5",
        "",
    ]
    assert rollout_outcome({"rollback.rolled_back": "not json"}) == "rolled back"
    assert promotion_rows(history)[0][PROMOTION_COLUMNS.index("rollout")] == "rejected: agreement 0.41 < 0.9"


def test_card_markdown_lists_test_metrics():
    current = {"name": "m", "version": "3", "alias": "champion", "run_id": "abc", "task": "classification",
               "target": "income", "loaded_at": 0, "metrics": {"test_loss": 0.31, "test_accuracy": 0.85}}  # fmt: skip
    text = card_markdown(current)
    assert text.startswith("### m v3 (alias `champion`)")
    assert "| test_accuracy | 0.8500 |" in text and "Run `abc`" in text
    assert "No test metrics" in card_markdown({**current, "metrics": {}})
