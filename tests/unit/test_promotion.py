"""The gate's decision rules: scores decide only between comparable models; everything else fails closed."""

import pytest
import typer
from typer.testing import CliRunner

from jobs.compatibility import operator_approval
from jobs.promote import Approval, ChampionCheck, RecentSlice, Rule, decide, decision_tags, main


def test_first_model_is_promoted():
    decision = decide("roc_auc", 0.8, 0.0, None)
    assert decision.promote and decision.rule is Rule.NO_CHAMPION and decision.reason == "no champion to beat"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote"),
    [
        (0.91, 0.90, 0.0, True),
        (0.90, 0.90, 0.0, False),
        (0.905, 0.90, 0.01, False),
        (0.92, 0.90, 0.01, True),
        (0.89, 0.90, 0.0, False),
    ],
)
def test_higher_is_better_metric(candidate, champion, margin, promote):
    decision = decide("roc_auc", candidate, margin, ChampionCheck("1", score=champion))
    assert decision.promote is promote and decision.rule is Rule.SCORE


def test_lower_is_better_metric():
    assert decide("rmse", 1.0, 0.1, ChampionCheck("1", score=1.2)).promote
    assert not decide("rmse", 1.15, 0.1, ChampionCheck("1", score=1.2)).promote
    assert not decide("log_loss", 0.5, 0.0, ChampionCheck("1", score=0.4)).promote


def test_a_champion_that_cannot_be_scored_is_a_rejection_not_an_absent_champion():
    champion = ChampionCheck("4", problem="test set lacks columns ['age']")
    decision = decide("roc_auc", 0.99, 0.0, champion)
    assert not decision.promote and decision.rule is Rule.UNSCORABLE and decision.rule.refusal
    assert decision.reason == "champion v4 cannot be scored on this test set: test set lacks columns ['age']"
    assert decision.champion_version == "4" and decision.champion_score is None


def test_a_contract_change_is_rejected_with_every_change_named():
    changes = ["task changed: classification -> regression", "features removed or renamed: age"]
    decision = decide("rmse", 0.1, 0.0, ChampionCheck("2", changes=changes))
    assert not decision.promote and decision.rule is Rule.INCOMPATIBLE and decision.rule.refusal
    assert decision.reason == (
        "candidate breaks the serving contract of champion v2: "
        "task changed: classification -> regression; features removed or renamed: age"
    )
    assert decision.contract_changes == changes


def test_an_operator_forces_with_a_reason_that_is_recorded_with_the_changes():
    approval = Approval("alice@ops", "new schema agreed with every client")
    decision = decide("roc_auc", 0.5, 0.0, ChampionCheck("3", changes=["target changed: 'a' -> 'b'"]), approval)
    assert decision.promote and decision.rule is Rule.FORCED and decision.forced_by == "alice@ops"
    assert decision.reason == (
        "forced by operator alice@ops: new schema agreed with every client; "
        "contract changes approved: target changed: 'a' -> 'b'"
    )
    tags = decision_tags(decision, approval)
    assert tags["promotion.forced_by"] == "alice@ops"
    assert tags["promotion.force_reason"] == "new schema agreed with every client"
    assert operator_approval(tags) == "alice@ops"


def test_a_forced_promotion_needs_a_reason():
    with pytest.raises(ValueError, match="needs a reason"):
        Approval("alice@ops", "  ")


FORCED = {"promotion.decision": "promoted", "promotion.rule": "forced", "promotion.forced_by": "a"}


@pytest.mark.parametrize(
    "tags",
    [
        {},
        {"promotion.decision": "promoted", "promotion.rule": "score"},
        {**FORCED, "promotion.decision": "rejected", "promotion.force_reason": "r"},
        {**FORCED, "promotion.force_reason": ""},
        {**FORCED, "promotion.forced_by": "", "promotion.force_reason": "r"},
    ],
)
def test_only_a_recorded_forced_promotion_with_operator_and_reason_is_an_approval(tags):
    assert operator_approval(tags) is None


def test_rejected_decisions_are_recorded_with_their_rule_and_no_champion_score():
    decision = decide("roc_auc", 0.9, 0.0, ChampionCheck("7", problem="ValueError: boom"))
    tags = decision_tags(decision, None)
    assert tags["promotion.decision"] == "rejected" and tags["promotion.rule"] == "unscorable"
    assert tags["promotion.champion_version"] == "7" and tags["promotion.champion_score"] == ""
    assert "promotion.forced_by" not in tags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "m", "--version", "2", "--force"], "needs --reason"),
        (["--model", "m", "--version", "2", "--force", "--reason", " "], "needs --reason"),
        (["--model", "m", "--version", "2", "--reason", "because"], "only goes with --force"),
        (["--version", "2"], "--model"),
    ],
)
def test_promote_cli_refuses_a_force_without_reason_and_a_missing_model(argv, message):
    app = typer.Typer()
    app.command()(main)
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 2
    assert message in result.output


def test_the_version_records_who_the_decision_was_made_for_and_who_promoted_it():
    from core.audit import Actor
    from jobs.registry import REQUESTED_BY_JSON_TAG, requester, requester_tags

    key = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci-deploy")
    promoted = decision_tags(decide("roc_auc", 0.9, 0.0, None), None, key)
    assert promoted["audit.promoted_by"] == "key:ci-deploy (id 3fa2c1d0e9b8)"
    assert promoted["audit.decided_for"] == promoted["audit.promoted_by"]
    rejected = decision_tags(decide("roc_auc", 0.5, 0.0, ChampionCheck("1", score=0.9)), None, key)
    assert "audit.promoted_by" not in rejected and rejected["audit.decided_for"].startswith("key:ci-deploy")
    # The dispatcher hands the requester over as JSON; without it, whoever runs the process.
    assert requester(requester_tags(key)[REQUESTED_BY_JSON_TAG]) == key
    assert requester(None).kind == "operator" and requester("not json").kind == "operator"


# The recent feedback slice ------------------------------------------------------------------------

RECENT = RecentSlice(rows=120, score=0.86)


def _with_recent(champion_test, champion_recent, candidate_test=0.90, recent=RECENT, **kw):
    champion = ChampionCheck("5", score=champion_test, recent_score=champion_recent)
    return decide("roc_auc", candidate_test, 0.0, champion, None, recent, **kw)


def test_recent_and_test_promotes_a_candidate_better_on_recent_rows_and_no_worse_on_the_test_split():
    # Better where production is now, slightly worse on the old test split, within the tolerance.
    decision = _with_recent(champion_test=0.91, champion_recent=0.80)
    assert decision.promote and decision.rule is Rule.SCORE
    assert decision.reason == (
        "roc_auc on the recent slice (120 rows) 0.86000 beats champion 0.80000 by more than 0.0; "
        "roc_auc on the test split 0.90000, champion 0.91000: not worse by more than the tolerance 0.02"
    )
    assert (decision.recent_candidate_score, decision.recent_champion_score, decision.recent_rows) == (0.86, 0.80, 120)
    assert decision.recent_rule == "recent_and_test"


def test_recent_and_test_rejects_a_candidate_that_forgot_the_test_split():
    decision = _with_recent(champion_test=0.95, champion_recent=0.80)
    assert not decision.promote and decision.rule is Rule.SCORE
    assert "worse by more than the tolerance 0.02" in decision.reason and "not worse" not in decision.reason
    # The tolerance is the operator's: a looser one lets the same candidate through.
    assert _with_recent(champion_test=0.95, champion_recent=0.80, test_tolerance=0.06).promote


def test_recent_and_test_rejects_a_candidate_no_better_on_recent_rows():
    decision = _with_recent(champion_test=0.80, champion_recent=0.86)  # a tie on the slice
    assert not decision.promote
    assert decision.reason.startswith("roc_auc on the recent slice (120 rows) 0.86000 does not beat champion 0.86000")
    champion = ChampionCheck("5", score=0.80, recent_score=0.85)
    assert not decide("roc_auc", 0.9, 0.02, champion, None, RECENT).promote  # the margin applies to the slice


def test_recent_only_and_test_only_each_look_at_one_split():
    worse_on_test = {"champion_test": 0.99, "champion_recent": 0.80}
    recent_only = _with_recent(**worse_on_test, recent_rule="recent_only")
    assert recent_only.promote
    not_deciding = "(recent_only; roc_auc on the test split 0.90000, champion 0.99000, not deciding)"
    assert recent_only.reason.endswith(not_deciding)
    test_only = _with_recent(**worse_on_test, recent_rule="test_only")
    assert not test_only.promote
    assert test_only.reason == (
        "roc_auc 0.90000 does not beat champion 0.99000 by more than 0.0 "
        "(test_only; on the recent slice (120 rows) 0.86000, champion 0.80000, not deciding)"
    )
    assert test_only.recent_rows == 120  # still recorded


def test_without_a_recent_slice_the_test_split_decides_as_before():
    for rule in ("recent_and_test", "recent_only", "test_only"):
        decision = decide("roc_auc", 0.91, 0.0, ChampionCheck("1", score=0.90), recent_rule=rule)
        assert decision.promote and decision.reason == "roc_auc 0.91000 beats champion 0.90000 by more than 0.0"
        assert decision.recent_rows is None and decision.recent_rule is None


def test_lower_is_better_metrics_keep_their_direction_on_both_splits():
    champion = ChampionCheck("2", score=1.00, recent_score=1.50)
    assert decide("rmse", 1.01, 0.0, champion, None, RecentSlice(40, 1.20)).promote  # 0.01 worse: tolerated
    assert not decide("rmse", 1.05, 0.0, champion, None, RecentSlice(40, 1.20)).promote  # 0.05 worse
    assert not decide("rmse", 0.90, 0.0, champion, None, RecentSlice(40, 1.60)).promote  # worse on the slice


def test_a_champion_that_cannot_be_scored_on_the_recent_slice_is_a_refusal():
    champion = ChampionCheck("6", score=0.9, recent_problem="ValueError: boom")
    decision = decide("roc_auc", 0.95, 0.0, champion, None, RECENT)
    assert not decision.promote and decision.rule is Rule.UNSCORABLE and decision.rule.refusal
    assert decision.reason == "champion v6 cannot be scored on the recent slice (120 rows): ValueError: boom"
    # Under test_only the slice does not decide, so it cannot block either.
    assert decide("roc_auc", 0.95, 0.0, champion, None, RECENT, "test_only").promote


def test_a_recent_slice_the_metric_cannot_score_leaves_the_decision_to_the_test_split():
    problem = "roc_auc is not defined on this test set (got nan)"
    one_class = RecentSlice(15, None, problem)
    champion = ChampionCheck("6", score=0.9, recent_score=None)
    better = decide("roc_auc", 0.95, 0.0, champion, None, one_class)
    assert better.promote and better.rule is Rule.SCORE and not better.rule.refusal
    assert better.reason == (
        "roc_auc 0.95000 beats champion 0.90000 by more than 0.0 (the recent slice (15 rows) cannot decide: "
        + problem
        + ")"
    )
    # Never a pass: the candidate must still beat the champion on the test split.
    worse = decide("roc_auc", 0.85, 0.0, champion, None, one_class)
    assert not worse.promote and worse.rule is Rule.SCORE
    # A first version has nothing to be compared with.
    assert decide("roc_auc", 0.95, 0.0, None, None, one_class).rule is Rule.NO_CHAMPION


def test_the_recent_scores_are_recorded_on_the_version_only_with_a_slice():
    tags = decision_tags(_with_recent(champion_test=0.91, champion_recent=0.80), None)
    assert tags["promotion.recent_rule"] == "recent_and_test"
    assert tags["promotion.recent_rows"] == "120"
    assert tags["promotion.recent_candidate_score"] == "0.860000"
    assert tags["promotion.recent_champion_score"] == "0.800000"
    unscored = decide("roc_auc", 0.9, 0.0, ChampionCheck("6", score=0.9, recent_problem="x"), None, RECENT)
    assert decision_tags(unscored, None)["promotion.recent_champion_score"] == ""
    plain = decision_tags(decide("roc_auc", 0.9, 0.0, ChampionCheck("1", score=0.8)), None)
    assert not [key for key in plain if key.startswith("promotion.recent_")]
