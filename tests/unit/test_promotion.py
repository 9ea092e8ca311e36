"""The gate's decision rules: scores decide only between comparable models; everything else fails closed."""

import pytest
import typer
from typer.testing import CliRunner

from jobs.compatibility import operator_approval
from jobs.promote import Approval, ChampionCheck, Rule, decide, decision_tags, main


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
