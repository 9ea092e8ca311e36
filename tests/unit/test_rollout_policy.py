"""The rollout rule (services/rollout/policy.py, docs/rollout.md): when a shadow window or a canary
step is complete, when a challenger is worse, what is decided, and probation's rollback rule;
at their boundaries, where they fail closed, for regression and without labels."""

from __future__ import annotations

import pytest

from core.settings import ProbationSettings, RolloutSettings
from jobs.config import RolloutPolicy
from services.feedback.store import PairedFigures, VersionWindow
from services.rollout.policy import (
    Action,
    ProbationAction,
    ProbationRule,
    WindowRule,
    describe,
    paired_document,
    probation_basis,
    probation_decision,
    probation_windows,
    rollout_decision,
    window_complete,
    worse,
)

RULE = WindowRule(
    window_requests=1000,
    window_s=3600.0,
    min_rows=200,
    min_agreement=0.9,
    min_labels=50,
    max_accuracy_drop=0.02,
    regression_tolerance=0.1,
)
STEPS = [0.05, 0.25]


def paired(
    rows: int = 0,
    requests: int | None = None,
    agreeing: int | None = None,
    labelled: int = 0,
    champion_correct: int = 0,
    challenger_correct: int = 0,
    served: int = 0,
    regression: bool = False,
) -> PairedFigures:
    return PairedFigures(
        rows=rows,
        requests=rows if requests is None else requests,
        agreeing=rows if agreeing is None else agreeing,
        labelled=labelled,
        champion_correct=champion_correct,
        challenger_correct=challenger_correct,
        challenger_served_rows=served,
        regression_rows=rows if regression else 0,
    )


# Window rule from policy and settings -------------------------------------------------------------


def test_the_policy_overrides_the_settings_only_where_it_sets_a_value():
    settings = RolloutSettings(window_requests=500, window_s=60, min_agreement=0.8, max_accuracy_drop=0.05)
    default = WindowRule.of(RolloutPolicy(mode="shadow"), settings)
    assert (default.window_requests, default.window_s, default.min_agreement, default.max_accuracy_drop) == (
        500,
        60,
        0.8,
        0.05,
    )
    own = WindowRule.of(
        RolloutPolicy(mode="shadow", window_requests=10, window_s=5, min_agreement=0.5, max_accuracy_drop=0.0),
        settings,
    )
    assert (own.window_requests, own.window_s, own.min_agreement, own.max_accuracy_drop) == (10, 5, 0.5, 0.0)
    assert own.min_rows == settings.min_rows and own.min_labels == settings.min_labels


# Figures -----------------------------------------------------------------------------------------


def test_shares_are_none_without_rows_and_regression_needs_every_row_a_value():
    empty = paired()
    assert empty.agreement is None and empty.champion_accuracy is None and empty.challenger_accuracy is None
    assert not empty.regression
    assert paired(10, regression=True).regression
    mixed = PairedFigures(10, 10, 10, 0, 0, 0, 0, regression_rows=9)
    assert not mixed.regression
    figures = paired(100, agreeing=90, labelled=40, champion_correct=30, challenger_correct=20)
    assert figures.agreement == 0.9 and figures.champion_accuracy == 0.75 and figures.challenger_accuracy == 0.5


def test_the_stored_document_carries_the_figures_and_the_thresholds():
    document = paired_document(paired(300, agreeing=240, served=12), 42.5, RULE)
    assert document["rows"] == 300 and document["agreement"] == 0.8 and document["challenger_served_rows"] == 12
    assert document["task"] == "classification" and document["elapsed_s"] == 42.5
    assert document["min_agreement"] == 0.9 and document["window_requests"] == 1000
    assert paired_document(paired(3, regression=True), 0, RULE)["task"] == "regression"


# Window complete --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("requests", "elapsed", "complete"),
    [(999, 3599.9, False), (1000, 0.0, True), (0, 3600.0, True), (1200, 10.0, True), (0, 0.0, False)],
)
def test_a_window_ends_at_its_requests_or_its_time_whichever_first(requests, elapsed, complete):
    assert window_complete(paired(requests, requests=requests), elapsed, RULE) is complete


# Worse ------------------------------------------------------------------------------------------


def test_with_enough_labels_accuracy_decides_at_the_margin():
    # Champion 0.80 on 50 labelled rows; the challenger may be at most 0.02 below.
    at_margin = paired(300, agreeing=100, labelled=50, champion_correct=40, challenger_correct=39)  # 0.78
    below = paired(300, agreeing=300, labelled=50, champion_correct=40, challenger_correct=38)  # 0.76
    assert worse(at_margin, RULE) is None  # exactly the drop allowed: not worse, whatever agreement says
    reason = worse(below, RULE)
    assert reason is not None
    assert "0.760" in reason and "0.800" in reason and "0.020" in reason and "50 labelled" in reason


def test_labels_outweigh_agreement_a_challenger_right_where_the_champion_is_wrong_passes():
    better = paired(400, agreeing=200, labelled=100, champion_correct=50, challenger_correct=95)
    assert worse(better, RULE) is None


def test_without_enough_labels_agreement_decides_once_there_are_enough_rows():
    assert worse(paired(199, agreeing=0), RULE) is None  # too few rows: no judgement yet
    assert worse(paired(200, agreeing=180), RULE) is None  # 0.90: at the threshold
    reason = worse(paired(200, agreeing=179, labelled=49, champion_correct=49), RULE)
    assert reason is not None
    assert "0.895" in reason and "0.900" in reason and "200 paired rows" in reason and "49 labelled" in reason


def test_regression_agreement_is_by_tolerance_and_says_so():
    reason = worse(paired(250, agreeing=100, regression=True), RULE)
    assert reason is not None and "within 10% of the champion's value" in reason
    assert worse(paired(250, agreeing=250, regression=True), RULE) is None


# Shadow and canary decisions ----------------------------------------------------------------------


def test_an_open_window_continues_and_says_how_far_it_is():
    decision = rollout_decision("shadow", paired(150, requests=120), 30.0, RULE)
    assert decision.action is Action.CONTINUE
    assert "120 of 1000 paired requests" in decision.reason and "30 of 3600 s" in decision.reason


def test_harm_stops_early_a_worse_challenger_is_rejected_before_its_window_ends():
    decision = rollout_decision("shadow", paired(200, requests=200, agreeing=20), 5.0, RULE)
    assert decision.action is Action.REJECT
    assert decision.reason.startswith("shadow: agreement with the champion 0.100")


def test_a_worse_canary_step_is_rejected_and_names_its_step():
    figures = paired(300, agreeing=30, served=20)
    decision = rollout_decision("canary", figures, 1.0, RULE, step=1, judged_steps=STEPS)
    assert decision.action is Action.REJECT and decision.next_share is None
    assert decision.reason.startswith("canary step 2 (25% of traffic): agreement")


def test_a_window_that_ends_with_too_few_rows_rejects_fail_closed():
    decision = rollout_decision("shadow", paired(199, requests=199), 3600.0, RULE)
    assert decision.action is Action.REJECT
    assert "too few mirrored rows to judge" in decision.reason and "199 paired rows" in decision.reason
    assert "fewer than the 200" in decision.reason


def test_no_rows_at_all_when_the_time_is_up_is_a_rejection_too():
    decision = rollout_decision("canary", paired(), 3600.0, RULE, 0, STEPS)
    assert decision.action is Action.REJECT and "too few mirrored rows" in decision.reason


def test_a_shadow_not_worse_at_the_window_end_is_promoted_quoting_its_figures():
    decision = rollout_decision("shadow", paired(1000, agreeing=950), 100.0, RULE)
    assert decision.action is Action.PROMOTE
    assert "after 1000 paired requests" in decision.reason and "agreement 0.950 >= 0.900" in decision.reason
    assert decision.reason.endswith("promoted")


def test_a_shadow_window_ended_by_time_says_so():
    decision = rollout_decision("shadow", paired(400, requests=300, agreeing=400), 3600.0, RULE)
    assert decision.action is Action.PROMOTE and "after 3600 s (window 3600 s) with 300" in decision.reason


def test_a_canary_step_that_passes_moves_to_the_next_share_then_promotes_after_the_last():
    good = paired(1000, agreeing=990, labelled=60, champion_correct=50, challenger_correct=51, served=50)
    first = rollout_decision("canary", good, 10.0, RULE, step=0, judged_steps=STEPS)
    assert first.action is Action.NEXT_STEP and first.next_share == 0.25
    assert first.reason.startswith("canary step 1 (5% of traffic)") and first.reason.endswith("next step: 25%")
    assert "challenger accuracy 0.850 against the champion's 0.833" in first.reason
    last = rollout_decision("canary", good, 10.0, RULE, step=1, judged_steps=STEPS)
    assert last.action is Action.PROMOTE and last.next_share is None


def test_labelled_but_not_enough_rows_is_neither_an_early_rejection_nor_a_pass():
    # 60 labels show a much worse challenger, but fewer rows than min_rows: wait for the window.
    figures = paired(100, agreeing=100, labelled=60, champion_correct=60, challenger_correct=0)
    assert rollout_decision("shadow", figures, 1.0, RULE).action is Action.CONTINUE
    assert rollout_decision("shadow", figures, 3600.0, RULE).action is Action.REJECT  # too few rows


def test_describe_quotes_the_figures():
    assert describe(paired(10, agreeing=5)) == "10 paired rows of 10 requests, agreement 0.500, none labelled"
    text = describe(paired(10, labelled=4, champion_correct=3, challenger_correct=2))
    assert "4 labelled: accuracy champion 0.750, challenger 0.500" in text
    assert describe(paired(3, regression=True)).endswith("(regression outputs)")
    assert "agreement n/a" in describe(paired())


# Probation -------------------------------------------------------------------------------------

PROBATION = ProbationRule(window_s=3600.0, min_labels=50, min_rows=200, max_drop=0.02, use_estimate=True)


def window(
    rows: int = 0, labelled: int = 0, correct: int = 0, probability_rows: int | None = None, mean: float | None = None
) -> VersionWindow:
    with_probability = (rows if mean is not None else 0) if probability_rows is None else probability_rows
    return VersionWindow(rows, labelled, correct, with_probability, mean)


def test_probation_rule_comes_from_the_settings():
    rule = ProbationRule.of(ProbationSettings(window_s=60, min_labels=5, min_rows=7, max_drop=0.1, use_estimate=False))
    assert rule == ProbationRule(60, 5, 7, 0.1, False, 0.95)


def test_both_sides_compare_over_the_new_champions_time_capped_at_the_window():
    assert probation_windows(30.0, PROBATION) == 30.0
    assert probation_windows(7200.0, PROBATION) == 3600.0
    assert probation_windows(-1.0, PROBATION) == 0.0


def test_labels_are_the_basis_when_both_sides_have_enough_else_the_estimate_else_none():
    enough = window(300, 50, 40, mean=0.8)
    assert probation_basis(enough, enough, PROBATION) == "labels"
    short = window(300, 49, 40, mean=0.8)
    assert probation_basis(short, enough, PROBATION) == "estimate"
    assert probation_basis(enough, short, PROBATION) == "estimate"
    no_estimate = ProbationRule(3600.0, 50, 200, 0.02, use_estimate=False)
    assert probation_basis(short, enough, no_estimate) is None
    few_rows = window(199, 0, 0, mean=0.8)
    assert probation_basis(few_rows, enough, PROBATION) is None
    regression = window(500, 0, 0)  # no class probabilities: no estimate
    assert probation_basis(regression, regression, PROBATION) is None


def test_a_breach_on_labels_rolls_back_at_once_quoting_both_figures():
    new, previous = window(300, 60, 42), window(300, 80, 64)  # 0.70 against 0.80
    decision = probation_decision(new, previous, 120.0, PROBATION, False, "v3", "v2")
    assert decision.action is ProbationAction.ROLL_BACK and decision.basis == "labels"
    assert decision.drop == pytest.approx(0.1)
    reason = decision.reason
    assert "live accuracy of v3 0.700 on 60 labelled rows against v2's 0.800 on 80 labelled rows" in reason
    assert "over the 120 s before it" in reason and "lower by 0.100, more than 0.020" in reason


def test_a_drop_at_the_margin_is_no_breach():
    new, previous = window(300, 50, 39), window(300, 50, 40)  # 0.78 against 0.80: exactly 0.02
    decision = probation_decision(new, previous, 120.0, PROBATION, False)
    assert decision.action is ProbationAction.CONTINUE and decision.basis == "labels"


def test_without_labels_the_estimated_accuracy_decides():
    new, previous = window(250, mean=0.70), window(250, mean=0.90)
    decision = probation_decision(new, previous, 60.0, PROBATION, False, "v3", "v2")
    assert decision.action is ProbationAction.ROLL_BACK and decision.basis == "estimate"
    assert "estimated accuracy of v3 0.700 on 250 rows against v2's 0.900 on 250 rows" in decision.reason


def test_a_breach_counts_even_on_the_tick_the_window_ends():
    new, previous = window(300, 60, 30), window(300, 60, 60)
    assert probation_decision(new, previous, 3600.0, PROBATION, True).action is ProbationAction.ROLL_BACK


def test_a_window_over_without_breach_passes_when_figures_were_compared():
    new, previous = window(300, 60, 55), window(300, 60, 54)
    decision = probation_decision(new, previous, 3600.0, PROBATION, False)
    assert decision.action is ProbationAction.PASSED and decision.basis == "labels"
    assert decision.reason.startswith("probation of 3600 s passed")


def test_a_window_over_passes_on_an_earlier_basis_even_when_the_last_tick_had_none():
    decision = probation_decision(window(10), window(10), 3700.0, PROBATION, True)
    assert decision.action is ProbationAction.PASSED and decision.basis is None
    assert "too few figures to compare" in decision.reason


def test_never_enough_figures_is_inconclusive_and_the_champion_stays():
    decision = probation_decision(window(100, 3, 3), window(0), 3600.0, PROBATION, False, "v3", "v2")
    assert decision.action is ProbationAction.INCONCLUSIVE
    assert "v3: 3 labelled rows (needs 50)" in decision.reason and "v3 stays champion" in decision.reason
    assert "no class probabilities" in decision.reason


def test_nothing_to_compare_yet_continues():
    decision = probation_decision(window(10, mean=0.5), window(400, 100, 90, mean=0.9), 30.0, PROBATION, False)
    assert decision.action is ProbationAction.CONTINUE and decision.basis is None
    assert "nothing to compare by yet" in decision.reason


def test_regression_probation_has_no_basis_and_ends_inconclusive():
    # Regression rows carry no label to check and no class probability to estimate from.
    regression = VersionWindow(rows=5000, labelled=0, correct=0, probability_rows=0, mean_probability=None)
    decision = probation_decision(regression, regression, 3600.0, PROBATION, False)
    assert decision.action is ProbationAction.INCONCLUSIVE


def test_a_better_new_champion_continues_then_passes():
    new, previous = window(300, 60, 58), window(300, 60, 40)
    assert probation_decision(new, previous, 10.0, PROBATION, False).action is ProbationAction.CONTINUE
    assert probation_decision(new, previous, 3600.0, PROBATION, True).action is ProbationAction.PASSED


def test_a_drop_chance_explains_does_not_count_and_one_it_does_not_explain_does():
    """Two equally good models differ by a few points on a few dozen labels: at the shipped
    confidence that is no breach; the same drop on thousands of labels, or a large one on few, is."""
    from services.rollout.policy import significantly_lower

    assert not significantly_lower(0.931, 216, 0.897, 58, 0.02, 0.95)
    assert significantly_lower(0.931, 5000, 0.897, 5000, 0.02, 0.95)
    assert significantly_lower(0.952, 63, 0.133, 45, 0.02, 0.95)
    assert significantly_lower(0.931, 216, 0.897, 58, 0.02, 0.5)  # 0.5: the plain comparison
    assert not significantly_lower(0.90, 1000, 0.89, 1000, 0.02, 0.5)  # within the margin
    # Perfect records on both sides: no spread to weigh, the margin alone decides.
    assert significantly_lower(1.0, 10, 0.0, 10, 0.02, 0.95)
    rule = WindowRule(**{**RULE.__dict__, "confidence": 0.95})
    noisy = paired(rows=300, labelled=58, champion_correct=54, challenger_correct=52)
    assert worse(noisy, rule) is None and worse(noisy, RULE) is not None
