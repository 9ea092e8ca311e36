"""The gate under a shadow or canary policy, and the registry actions of a rollout (jobs/rollout.py)
against a real MLflow registry (SQLite in a temporary directory): a candidate that passes becomes the
challenger, not the champion; the gate fails closed when it cannot hand it over; every move of the
champion records what it replaced, and a rollback goes back to exactly that."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pandas as pd
import pytest
import typer
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from core.audit import Actor
from core.settings import Settings, get_settings
from jobs import promote
from jobs.compatibility import CONTRACT_TAG, MAX_TAG_CHARS
from jobs.config import DataConfig, JobConfig
from jobs.promote import (
    ChampionCheck,
    Decision,
    RolloutContext,
    Rule,
    decide,
    decision_tags,
    gate,
    main,
    with_rollout_mode,
)
from jobs.rollout import (
    CHALLENGER_ALIAS,
    DECISION_REASON_TAG,
    FIGURES_TAG,
    JOB_TAG,
    POLICY_TAG,
    PREVIOUS_CHAMPION_TAG,
    REQUESTED_AT_TAG,
    RESTORED_FROM_TAG,
    ROLLED_BACK_TAG,
    STATE_TAG,
    alias_version,
    json_tag,
    move_champion,
    policy_from_tag,
    promote_challenger,
    reject_challenger,
    rollback,
)
from services.training_jobs.store import promotion_outcome

ALIAS = "champion"
BETTER = ChampionCheck("1", score=0.80)  # a candidate at 0.90 beats it


# The decision ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["shadow", "canary"])
def test_a_candidate_that_passes_under_a_policy_becomes_the_challenger(mode):
    decision = decide("roc_auc", 0.90, 0.0, BETTER, rollout=RolloutContext(mode))
    assert decision.promote and decision.rule is Rule.SCORE and decision.rollout == mode
    assert not decision.champion_moved and decision.label == "challenger"
    assert decision.reason == (
        f"roc_auc 0.90000 beats champion 0.80000 by more than 0.0; rolled out as a {mode} challenger "
        "(the rollout service decides)"
    )


def test_immediate_is_todays_behaviour():
    for context in (None, RolloutContext(), RolloutContext("immediate", challenger="4", service_problem="x")):
        decision = decide("roc_auc", 0.90, 0.0, BETTER, rollout=context)
        assert decision.promote and decision.rollout is None and decision.champion_moved
        assert decision.label == "promoted" and decision.rule is Rule.SCORE


def test_a_rejected_candidate_is_rejected_whatever_the_policy():
    busy = RolloutContext("shadow", challenger="4", service_problem="no database")
    decision = decide("roc_auc", 0.70, 0.0, BETTER, rollout=busy)
    assert not decision.promote and decision.rule is Rule.SCORE and not decision.rule.refusal
    assert decision.rollout is None and decision.label == "rejected"


def test_a_first_version_and_a_forced_one_are_always_immediate():
    shadow = RolloutContext("shadow", challenger="4", service_problem="no database")
    first = decide("roc_auc", 0.5, 0.0, None, rollout=shadow)
    assert first.promote and first.rule is Rule.NO_CHAMPION and first.champion_moved
    forced = decide("roc_auc", 0.5, 0.0, BETTER, promote.Approval("alice@ops", "hotfix"), rollout=shadow)
    assert forced.promote and forced.rule is Rule.FORCED and forced.champion_moved


def test_another_rollout_in_progress_is_a_refusal():
    decision = decide("roc_auc", 0.90, 0.0, BETTER, rollout=RolloutContext("canary", challenger="4"))
    assert not decision.promote and decision.rule is Rule.ROLLOUT_BUSY and decision.rule.refusal
    assert decision.rollout is None and decision.label == "rejected"
    assert decision.reason == (
        "a rollout of version 4 is in progress (roc_auc 0.90000 beats champion 0.80000 by more than 0.0)"
    )


def test_no_rollout_service_is_a_refusal():
    context = RolloutContext("shadow", challenger="4", service_problem="DATABASE_URL is not set")
    decision = decide("roc_auc", 0.90, 0.0, BETTER, rollout=context)
    assert not decision.promote and decision.rule is Rule.NO_ROLLOUT_SERVICE and decision.rule.refusal
    assert decision.reason.startswith("no rollout service would judge a shadow challenger: DATABASE_URL is not set (")


def test_the_tags_say_challenger_and_the_rollout_and_nobody_promoted_it():
    key = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci")
    challenger = decide("roc_auc", 0.90, 0.0, BETTER, rollout=RolloutContext("shadow"))
    tags = decision_tags(challenger, None, key)
    assert tags["promotion.decision"] == "challenger" and tags["promotion.rollout"] == "shadow"
    assert "audit.promoted_by" not in tags and tags["audit.decided_for"].startswith("key:ci")
    promoted = decision_tags(decide("roc_auc", 0.90, 0.0, BETTER), None, key)
    assert promoted["promotion.decision"] == "promoted" and promoted["promotion.rollout"] == "immediate"
    assert "audit.promoted_by" in promoted
    busy = decision_tags(decide("roc_auc", 0.9, 0.0, BETTER, rollout=RolloutContext("shadow", "3")), None)
    assert busy["promotion.decision"] == "rejected" and busy["promotion.rule"] == "rollout_busy"
    assert busy["promotion.rollout"] == ""


def test_the_cli_mode_replaces_only_the_mode_of_the_configs_policy():
    config = _config("m", mode="canary").with_overrides({"promotion.rollout.canary_steps": [0.1, 1.0]})
    shadow = with_rollout_mode(config, "shadow")
    assert shadow.promotion.rollout.mode == "shadow" and shadow.promotion.rollout.canary_steps == [0.1, 1.0]
    assert config.promotion.rollout.mode == "canary"
    assert with_rollout_mode(config, None) is config


# The job record ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("promotion", "expected"),
    [
        ({"promote": True, "rollout": None}, (True, None)),
        ({"promote": True, "rollout": "shadow"}, (False, "shadow")),
        ({"promote": False, "rollout": None}, (False, None)),
        ({"promote": True}, (True, None)),  # a result line from before rollouts
        ({"promote": False}, (False, None)),
        (None, (None, None)),  # promotion turned off
    ],
)
def test_the_job_record_says_challenger_not_promoted(promotion, expected):
    assert promotion_outcome({"promotion": promotion, "model_version": "3"}) == expected


# Bounded tags ------------------------------------------------------------------------------------


def test_json_tags_stay_json_within_the_limit():
    small = {"rows": 10, "agreement": 0.5}
    assert json.loads(json_tag(small)) == small
    huge = {"reason": 'x"é' * 5000}
    cut = json_tag(huge)
    assert len(cut) <= MAX_TAG_CHARS and "truncated" in json.loads(cut)
    assert len(json_tag(huge, 50)) <= 50 and json.loads(json_tag(huge, 50))
    assert json_tag(huge, 5) == "{}"


# Against a registry --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    """One SQLite registry for the module (creating one takes seconds); each test has its own model."""
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('registry') / 'mlflow.db'}")


@pytest.fixture
def model(registry: MlflowClient) -> str:
    name = f"m-{uuid.uuid4().hex[:8]}"
    registry.create_registered_model(name)
    return name


def _versions(client: MlflowClient, name: str, count: int) -> list[str]:
    return [str(client.create_model_version(name, source=f"/nowhere/{name}/{i}").version) for i in range(count)]


def _alias(client: MlflowClient, name: str, alias: str = ALIAS) -> str | None:
    found = alias_version(client, name, alias)
    return None if found is None else str(found.version)


def _tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


def test_move_champion_records_what_it_replaced_and_clears_restored(registry, model):
    v1, v2 = _versions(registry, model, 2)
    move_champion(registry, model, ALIAS, v1, None)
    assert _alias(registry, model) == v1 and _tags(registry, model, v1)[PREVIOUS_CHAMPION_TAG] == ""
    registry.set_model_version_tag(model, v2, RESTORED_FROM_TAG, "9")
    move_champion(registry, model, ALIAS, v2, v1, {"k": "v" * (MAX_TAG_CHARS + 10)})
    tags = _tags(registry, model, v2)
    assert _alias(registry, model) == v2 and tags[PREVIOUS_CHAMPION_TAG] == v1
    assert RESTORED_FROM_TAG not in tags and len(tags["k"]) == MAX_TAG_CHARS
    assert registry.get_registered_model(model).tags[CONTRACT_TAG] == v2
    # Moving onto the version already there replaces nothing: what a rollback restores stays.
    move_champion(registry, model, ALIAS, v2, v2)
    assert _tags(registry, model, v2)[PREVIOUS_CHAMPION_TAG] == v1


def test_promote_challenger_moves_the_champion_and_removes_the_challenger(registry, model):
    v1, v2 = _versions(registry, model, 2)
    move_champion(registry, model, ALIAS, v1, None)
    registry.set_registered_model_alias(model, CHALLENGER_ALIAS, v2)
    figures = {"rows": 1200, "agreement": 0.97}
    assert promote_challenger(registry, model, ALIAS, v2, "agreement 0.97 >= 0.9", figures) == v1
    tags = _tags(registry, model, v2)
    assert tags[STATE_TAG] == "promoted" and tags[DECISION_REASON_TAG] == "agreement 0.97 >= 0.9"
    assert json.loads(tags[FIGURES_TAG]) == figures and tags[PREVIOUS_CHAMPION_TAG] == v1
    assert _alias(registry, model) == v2 and _alias(registry, model, CHALLENGER_ALIAS) is None
    assert registry.get_registered_model(model).tags[CONTRACT_TAG] == v2


def test_a_decision_leaves_a_newer_challenger_alone(registry, model):
    v1, v2, v3 = _versions(registry, model, 3)
    move_champion(registry, model, ALIAS, v1, None)
    registry.set_registered_model_alias(model, CHALLENGER_ALIAS, v3)  # set after v2's rollout began
    reject_challenger(registry, model, v2, "agreement 0.41 < 0.9", {"figures": list(range(3000))})
    tags = _tags(registry, model, v2)
    assert tags[STATE_TAG] == "rejected" and tags[DECISION_REASON_TAG] == "agreement 0.41 < 0.9"
    assert len(tags[FIGURES_TAG]) <= MAX_TAG_CHARS and json.loads(tags[FIGURES_TAG])
    assert _alias(registry, model, CHALLENGER_ALIAS) == v3 and _alias(registry, model) == v1
    reject_challenger(registry, model, v3, "too few mirrored rows to judge", {})
    assert _alias(registry, model, CHALLENGER_ALIAS) is None and _alias(registry, model) == v1


def test_rollback_goes_back_to_the_version_replaced_and_tags_both(registry, model):
    v1, v2 = _versions(registry, model, 2)
    move_champion(registry, model, ALIAS, v1, None)
    move_champion(registry, model, ALIAS, v2, v1)
    figures = {"basis": "labels", "previous": 0.84, "current": 0.61}
    assert rollback(registry, model, ALIAS, "accuracy fell", "probation", figures, expected_current=v2) == (v2, v1)
    assert _alias(registry, model) == v1 and registry.get_registered_model(model).tags[CONTRACT_TAG] == v1
    record = json.loads(_tags(registry, model, v2)[ROLLED_BACK_TAG])
    assert record["to"] == v1 and record["reason"] == "accuracy fell" and record["by"] == "probation"
    assert record["figures"] == figures and record["at"]
    assert _tags(registry, model, v1)[RESTORED_FROM_TAG] == v2
    # Promoted again later, v2 is no longer a restored version, and v1 is what it replaced.
    move_champion(registry, model, ALIAS, v2, v1)
    assert RESTORED_FROM_TAG not in _tags(registry, model, v2)


def test_rollback_refuses_when_there_is_nothing_safe_to_go_back_to(registry, model):
    v1, v2, v3 = _versions(registry, model, 3)
    with pytest.raises(ValueError, match="has no 'champion' alias"):
        rollback(registry, model, ALIAS, "r", "me")
    move_champion(registry, model, ALIAS, v1, None)
    with pytest.raises(ValueError, match=f"version {v1} records no previous champion"):
        rollback(registry, model, ALIAS, "r", "me")
    move_champion(registry, model, ALIAS, v2, v1)
    with pytest.raises(ValueError, match=f"is version {v2}, not {v3}: it moved since"):
        rollback(registry, model, ALIAS, "r", "me", expected_current=v3)
    with pytest.raises(ValueError, match="needs a reason"):
        rollback(registry, model, ALIAS, "  ", "me")
    registry.delete_model_version(model, v1)
    with pytest.raises(ValueError, match=f"version {v1}, the champion before version {v2}, no longer exists"):
        rollback(registry, model, ALIAS, "r", "me")
    assert _alias(registry, model) == v2 and ROLLED_BACK_TAG not in _tags(registry, model, v2)


# The gate ------------------------------------------------------------------------------------------


def _config(name: str, mode: str = "immediate") -> JobConfig:
    data = DataConfig(train_uri="memory", target="income")
    return JobConfig(name=name, data=data).with_overrides({"promotion.rollout.mode": mode})


def _settings(uri: str, database: str | None = "postgresql://postgres@127.0.0.1:5432/x", **kw: Any) -> Settings:
    return Settings(mlflow={"tracking_uri": uri}, database={"url": database}, **kw)


@pytest.fixture
def scored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate scores 0.9 and the champion 0.8: the gate's registry side, without models."""
    monkeypatch.setattr(promote, "_metric_of", lambda predictor, metric, test: 0.9)
    monkeypatch.setattr(promote, "check_champion", lambda client, name, version, *a: ChampionCheck(version, 0.8))


def _gate(client: MlflowClient, name: str, version: str, mode: str, settings: Settings) -> Decision:
    return gate(client, name, ALIAS, version, None, _config(name, mode), pd.DataFrame(), settings=settings)  # type: ignore[arg-type]


def test_the_gate_hands_a_passing_candidate_to_the_rollout_service(registry, model, scored):
    v1, v2 = _versions(registry, model, 2)
    settings = _settings(registry.tracking_uri, training={"job_id": "job-7"})
    assert _gate(registry, model, v1, "shadow", settings).rule is Rule.NO_CHAMPION  # the first: at once
    decision = _gate(registry, model, v2, "canary", settings)
    assert decision.promote and decision.rollout == "canary"
    assert _alias(registry, model) == v1 and _alias(registry, model, CHALLENGER_ALIAS) == v2
    tags = _tags(registry, model, v2)
    policy = policy_from_tag(tags[POLICY_TAG])
    assert policy is not None and policy.mode == "canary" and policy.canary_steps == [0.05, 0.25, 1.0]
    assert tags[JOB_TAG] == "job-7" and tags[REQUESTED_AT_TAG]
    assert tags["promotion.decision"] == "challenger" and tags["promotion.rollout"] == "canary"
    assert PREVIOUS_CHAMPION_TAG not in tags and registry.get_registered_model(model).tags[CONTRACT_TAG] == v1
    # Gated again, the challenger itself is no other rollout.
    assert _gate(registry, model, v2, "canary", settings).rollout == "canary"


def test_the_gate_refuses_while_another_rollout_is_in_progress(registry, model, scored):
    v1, v2, v3 = _versions(registry, model, 3)
    settings = _settings(registry.tracking_uri)
    _gate(registry, model, v1, "immediate", settings)
    _gate(registry, model, v2, "shadow", settings)
    decision = _gate(registry, model, v3, "shadow", settings)
    assert not decision.promote and decision.rule is Rule.ROLLOUT_BUSY
    assert decision.reason.startswith(f"a rollout of version {v2} is in progress")
    assert _alias(registry, model) == v1 and _alias(registry, model, CHALLENGER_ALIAS) == v2
    assert _tags(registry, model, v3)["promotion.rule"] == "rollout_busy" and POLICY_TAG not in _tags(
        registry, model, v3
    )
    # An immediate promotion is not held up: the rollout service ends the rollout it overtook.
    assert _gate(registry, model, v3, "immediate", settings).champion_moved
    assert _alias(registry, model) == v3 and _tags(registry, model, v3)[PREVIOUS_CHAMPION_TAG] == v1


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [({"database": None}, "DATABASE_URL is not set"), ({"rollout": {"enabled": False}}, "ROLLOUT_ENABLED is false")],
)
def test_the_gate_refuses_a_policy_no_service_would_judge(registry, model, scored, overrides, problem):
    v1, v2 = _versions(registry, model, 2)
    database = overrides.pop("database", "postgresql://postgres@127.0.0.1:5432/x")
    settings = _settings(registry.tracking_uri, database, **overrides)
    _gate(registry, model, v1, "immediate", settings)
    decision = _gate(registry, model, v2, "shadow", settings)
    assert not decision.promote and decision.rule is Rule.NO_ROLLOUT_SERVICE and problem in decision.reason
    assert _alias(registry, model) == v1 and _alias(registry, model, CHALLENGER_ALIAS) is None


def test_an_immediate_move_records_the_champion_it_replaced(registry, model, scored):
    v1, v2 = _versions(registry, model, 2)
    settings = _settings(registry.tracking_uri, database=None)  # immediate needs no rollout service
    _gate(registry, model, v1, "immediate", settings)
    decision = _gate(registry, model, v2, "immediate", settings)
    assert decision.champion_moved and decision.label == "promoted"
    assert _alias(registry, model) == v2 and _tags(registry, model, v2)[PREVIOUS_CHAMPION_TAG] == v1
    assert rollback(registry, model, ALIAS, "by hand", "me") == (v2, v1)


# The CLI ------------------------------------------------------------------------------------------


def _cli(argv: list[str]):
    app = typer.Typer()
    app.command()(main)
    return CliRunner().invoke(app, argv)


@pytest.fixture
def cli_registry(registry: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[MlflowClient]:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    get_settings.cache_clear()
    yield registry
    get_settings.cache_clear()


def test_the_cli_rolls_back_and_says_from_what_to_what(cli_registry, model):
    v1, v2 = _versions(cli_registry, model, 2)
    move_champion(cli_registry, model, ALIAS, v1, None)
    move_champion(cli_registry, model, ALIAS, v2, v1)
    result = _cli(["--rollback", "--model", model, "--reason", "complaints from the field"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"rolled_back": v2, "restored": v1}
    record = json.loads(_tags(cli_registry, model, v2)[ROLLED_BACK_TAG])
    assert record["by"] == promote.operator_identity() and record["reason"] == "complaints from the field"
    # Again: v1 records no previous champion, so nothing moves and the operator is told why.
    again = _cli(["--rollback", "--model", model, "--reason", "again"])
    assert again.exit_code == 1 and "records no previous champion" in again.output
    assert _alias(cli_registry, model) == v1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--rollback", "--model", "m"], "needs --reason"),
        (["--rollback", "--model", "m", "--reason", " "], "needs --reason"),
        (["--rollback", "--model", "m", "--version", "2", "--reason", "r"], "--model and --reason only"),
        (["--rollback", "--model", "m", "--force", "--reason", "r"], "--model and --reason only"),
        (["--rollback", "--model", "m", "--rollout", "shadow", "--reason", "r"], "--model and --reason only"),
        (["--model", "m"], "--version is required"),
        (
            ["--model", "m", "--version", "2", "--rollout", "blue-green"],
            "--rollout is one of immediate, shadow, canary",
        ),
        (["--model", "m", "--version", "2", "--reason", "r"], "only goes with --force or --rollback"),
    ],
)
def test_the_cli_refuses_what_does_not_go_together(argv, message):
    result = _cli(argv)
    assert result.exit_code == 2 and message in result.output


def test_the_cli_passes_the_rollout_mode_and_a_challenger_exits_0(monkeypatch):
    seen: dict[str, Any] = {}

    def fake(model: str, version: str, **kw: Any) -> Decision:
        seen.update(kw, model=model, version=version)
        # A canary is refused here: another version is the challenger.
        context = RolloutContext(kw["rollout"] or "immediate", challenger="5" if kw["rollout"] == "canary" else None)
        return decide("roc_auc", 0.9, 0.0, BETTER, rollout=context)

    monkeypatch.setattr(promote, "promote_version", fake)
    shadow = _cli(["--model", "m", "--version", "7", "--rollout", "shadow"])
    assert shadow.exit_code == 0 and seen["rollout"] == "shadow" and seen["version"] == "7"
    assert json.loads(shadow.stdout.strip().splitlines()[-1])["rollout"] == "shadow"
    assert "challenger, not yet champion" in shadow.output
    busy = _cli(["--model", "m", "--version", "7", "--rollout", "canary"])
    assert busy.exit_code == 3 and "a rollout of version 5 is in progress" in busy.output
    assert _cli(["--model", "m", "--version", "7"]).exit_code == 0 and seen["rollout"] is None
