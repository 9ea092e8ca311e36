"""The Model tab's rollout part: the `rollout` field of `GET /v1/models/{name}` as the page words it."""

from __future__ import annotations

from typing import Any

from ui.rollout import EVENT_COLUMNS, event_rows, figures_text, rollout_markdown, unavailable_markdown

POLICY = {"mode": "canary", "canary_steps": [0.05, 0.25, 1.0], "window_requests": None, "window_s": None,
          "min_agreement": None, "max_accuracy_drop": None}  # fmt: skip


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": 7, "model_name": "adult-income", "kind": "canary", "state": "active", "champion_version": "3",
        "challenger_version": "4", "step": 1, "share": 0.25, "policy": POLICY, "job_id": "0b7f",
        "started_at": "2026-01-01T10:00:00.123456+00:00", "step_started_at": "2026-01-01T10:30:00+00:00",
        "ended_at": None, "reason": None,
        "figures": {"rows": 1200, "requests": 400, "agreement": 0.9725, "labelled": 80, "champion_accuracy": 0.85,
                    "challenger_accuracy": 0.8375, "challenger_served_rows": 300},
    }  # fmt: skip
    return {**record, **changes}


# As the service stores a probation's figures (services/rollout/controller.py).
PROBATION_FIGURES = {
    "elapsed_s": 1800.5, "window_s": 3600.0, "compared_s": 1800.5, "basis": "labels", "basis_seen": True,
    "drop": 0.12, "max_drop": 0.02, "new_version": "3", "previous_version": "2",
    "new": {"rows": 500, "labelled": 60, "accuracy": 0.71, "estimated_accuracy": 0.8, "probability_rows": 500},
    "previous": {"rows": 800, "labelled": 90, "accuracy": 0.83, "estimated_accuracy": None, "probability_rows": 0},
}  # fmt: skip


def _event(rollout_id: int, at: str, kind: str, message: str, **figures: Any) -> dict[str, Any]:
    return {"rollout_id": rollout_id, "at": at, "kind": kind, "message": message, "figures": figures}


def _model(rollout: Any, **changes: Any) -> dict[str, Any]:
    return {"name": "adult-income", "version": "3", "rollout": rollout, **changes}


def test_an_active_canary_shows_its_step_share_and_figures_so_far():
    text = rollout_markdown(_model({"rollout": _record(), "probation": None, "events": []}))
    assert text.startswith("#### Rollout: adult-income")
    assert "**Challenger v4** against champion v3: canary, **active** · started 2026-01-01 10:00:00 UTC" in text
    assert "job `0b7f`" in text
    assert "step 2 of 2 (5% → 25% → promotion) · the challenger answers **25%** of the traffic" in text
    assert "Figures so far:" in text
    for line in (
        "| paired rows | 1200 |", "| paired requests | 400 |", "| agreement | 0.9725 |",
        "| labelled paired rows | 80 |", "| champion accuracy (same labelled rows) | 0.85 |",
        "| challenger accuracy (same labelled rows) | 0.8375 |", "| rows the challenger answered | 300 |",
    ):  # fmt: skip
        assert line in text, line
    # The figures in the order a reader wants them, not the JSON's.
    assert text.index("paired rows |") < text.index("| agreement") < text.index("challenger accuracy")


def test_a_shadow_says_clients_only_see_the_champion_and_waits_for_figures():
    shadow = _record(kind="shadow", share=0.0, step=0, figures={}, policy={**POLICY, "mode": "shadow"})
    text = rollout_markdown(_model({"rollout": shadow, "probation": None, "events": []}))
    assert "shadow (scores mirrored requests; clients get the champion's answers), **active**" in text
    assert "No figures yet: the service has not judged a window." in text
    assert "step" not in text.split("**active**")[1]  # a shadow has no canary steps


def test_a_decided_rollout_and_a_rolled_back_probation_show_their_reasons_and_figures():
    rejected = _record(
        state="rejected", ended_at="2026-01-01T11:00:00+00:00", reason="agreement 0.41 < 0.9 on 1200 paired rows",
        figures={"rows": 1200, "agreement": 0.41},
    )  # fmt: skip
    probation = _record(
        id=8, kind="probation", state="rolled_back", champion_version="2", challenger_version="3", share=0.0,
        step=0, policy={}, job_id=None, ended_at="2026-01-01T12:00:00+00:00",
        reason="live accuracy 0.71 of v3 is 0.12 below v2's 0.83 (allowed 0.02)",
        figures=PROBATION_FIGURES,
    )  # fmt: skip
    text = rollout_markdown(_model({"rollout": rejected, "probation": probation, "events": []}))
    assert "canary, **rejected** · started 2026-01-01 10:00:00 UTC, ended 2026-01-01 11:00:00 UTC" in text
    assert "Decision: agreement 0.41 < 0.9 on 1200 paired rows" in text
    assert "Deciding figures:" in text and "the challenger answers" not in text
    assert "**Probation of champion v3** (a rollback restores v2): **rolled_back**" in text
    assert "Decision: live accuracy 0.71 of v3 is 0.12 below v2's 0.83 (allowed 0.02)" in text
    # Figures the UI has no words for show under their own names, nested ones under their parent's.
    # A probation's figures are each version's predictions, not paired rows.
    for line in ("| compared on | labels |", "| drop (previous - new) | 0.12 |", "| allowed drop | 0.02 |",
                 "| new champion · predictions | 500 |", "| new champion · live accuracy | 0.71 |",
                 "| previous champion · predictions | 800 |", "| previous champion · estimated accuracy | n/a |",
                 "| compared over (s) | 1800 |"):  # fmt: skip
        assert line in text, line
    assert text.index("| compared on") < text.index("| new champion · predictions") < text.index("| compared over")
    assert "basis seen" not in text and "new version" not in text  # bookkeeping, and said above


def test_nothing_to_report_and_a_null_overview_say_why():
    empty = rollout_markdown(_model({"rollout": None, "probation": None, "events": []}))
    assert "No challenger and no champion on probation" in empty
    assert (
        rollout_markdown(_model(None))
        == "#### Rollout: adult-income\n\n_The API reports no rollout state for this model: it runs without the "
        "rollout service._"
    )
    unreachable = rollout_markdown(_model(None, rollout_error="rollout state unavailable: database timeout"))
    assert unreachable.endswith("_Rollout state unavailable: rollout state unavailable: database timeout_")
    # An API from before rollouts has no field at all.
    assert "reports no rollout state" in rollout_markdown({"name": "adult-income", "version": "3"})
    assert event_rows(_model(None)) == [] and event_rows({"name": "x"}) == []
    assert unavailable_markdown("Not found (404)") == "#### Rollout\n\n_Rollout state unavailable: Not found (404)_"


def test_decisions_come_newest_first_and_name_their_rollout():
    overview = {
        "rollout": _record(),
        "probation": _record(id=8, kind="probation", challenger_version="3", champion_version="2"),
        "events": [
            _event(7, "2026-01-01T10:00:00+00:00", "started", "canary of v4 at 5%"),
            _event(8, "2026-01-01T09:00:00+00:00", "passed", "no breach in 1h", basis="labels", drop=0.001),
            _event(7, "2026-01-01T10:30:00+00:00", "step", "step passed | next 25%", rows=600, agreement=0.98),
            _event(5, "2025-12-31T10:00:00+00:00", "rejected", "an older rollout"),
        ],
    }
    rows = event_rows(_model(overview))
    assert all(len(row) == len(EVENT_COLUMNS) for row in rows)
    assert [row[0] for row in rows] == [
        "2026-01-01 10:30:00", "2026-01-01 10:00:00", "2026-01-01 09:00:00", "2025-12-31 10:00:00"
    ]  # fmt: skip
    assert rows[0] == ["2026-01-01 10:30:00", "canary v4", "step", "step passed | next 25%",
                       "paired rows 600 · agreement 0.98"]  # fmt: skip
    assert rows[2][1] == "probation v3" and rows[2][4] == "compared on labels · drop (previous - new) 0.001"
    assert rows[3][1] == "#5"  # a rollout the overview no longer holds


def test_figures_are_words_and_numbers():
    assert figures_text({}, "canary") == "" and figures_text(None, "canary") == ""
    figures = {"rows": 12000.0, "agreement": 1.0, "elapsed_s": 35.25, "done": True, "steps": [1], "task": None}
    assert figures_text(figures, "shadow") == (
        "paired rows 12000 · agreement 1 · window elapsed (s) 35.25 · done yes · task n/a"
    )
    assert (
        figures_text(figures, "probation")
        == "predictions 12000 · elapsed (s) 35.25 · agreement 1 · done yes · task n/a"
    )
    # A rollout of a kind the page does not know: every figure under its own name.
    assert figures_text(figures, None) == "agreement 1 · done yes · elapsed s 35.25 · rows 12000 · task n/a"
