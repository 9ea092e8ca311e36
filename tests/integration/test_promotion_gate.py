"""The gate and the serving replica's alias follower against a real MLflow registry (SQLite and a
local artifact store, in this process): versions of another task never become or replace a
champion unless an operator approves them, and whatever moves the alias, a replica keeps serving
a contract its clients can use."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from jobs.compatibility import CONTRACT_TAG
from jobs.config import DataConfig, JobConfig
from jobs.predictor import TabularPredictor
from jobs.promote import Approval, Rule, gate
from jobs.registry import log_and_register
from serve_apps.champion import Poll, load_version, poll_alias
from tests.failing_registry import failing_registry
from tests.predictors import untrained_predictor

MODEL = "income"
ALIAS = "champion"
Registered = tuple[str, TabularPredictor, JobConfig, pd.DataFrame]


def _task(kind: str, seed: int) -> tuple[JobConfig, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = 400
    if kind == "income":
        frame = pd.DataFrame({"age": rng.integers(18, 80, rows), "sex": rng.choice(["Female", "Male"], rows)})
        frame["income"] = np.where(frame["age"] + rng.normal(0, 10, rows) > 45, ">50K", "<=50K")
        return JobConfig(name=MODEL, data=DataConfig(train_uri="memory", target="income")), frame
    # Another task: other features, another target, three classes.
    frame = pd.DataFrame({"mileage": rng.uniform(0, 3e5, rows), "fuel": rng.choice(["diesel", "petrol"], rows)})
    frame["risk"] = pd.cut(frame["mileage"], [-1, 1e5, 2e5, 4e5], labels=["low", "medium", "high"]).astype(str)
    return JobConfig(name="fleet", data=DataConfig(train_uri="memory", target="risk")), frame


def _predictor(config: JobConfig, frame: pd.DataFrame, seed: int) -> TabularPredictor:
    """Untrained: the gate looks at contracts and scores, not at how good the weights are."""
    import torch

    torch.manual_seed(seed)
    return untrained_predictor(frame, config)


def _register(kind: str, seed: int = 0) -> Registered:
    config, frame = _task(kind, seed)
    predictor = _predictor(config, frame, seed)
    with mlflow.start_run():
        version = log_and_register(predictor, frame, MODEL, MlflowClient(mlflow.get_tracking_uri())).version
    return str(version), predictor, config, frame


def _experiment(name: str, artifacts: Path) -> None:
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(name, artifact_location=str(artifacts)))


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    _experiment("gate", tmp_path / "artifacts")
    yield MlflowClient(uri)
    mlflow.set_tracking_uri(previous)


def _gate(client: MlflowClient, registered: Registered, **kw):
    version, predictor, config, frame = registered
    return gate(client, MODEL, ALIAS, version, predictor, config, frame, **kw)


def _champion(client: MlflowClient) -> str:
    return str(client.get_model_version_by_alias(MODEL, ALIAS).version)


def test_another_task_under_the_same_name_is_rejected_and_recorded(registry):
    first = _register("income")
    assert _gate(registry, first).rule is Rule.NO_CHAMPION
    other = _register("fleet")
    decision = _gate(registry, other)

    assert not decision.promote and decision.rule is Rule.INCOMPATIBLE
    assert decision.reason.startswith(f"candidate breaks the serving contract of champion v{first[0]}: ")
    assert "target changed: 'income' -> 'risk'" in decision.reason
    assert "features removed or renamed: age, sex" in decision.reason
    assert _champion(registry) == first[0]
    assert registry.get_registered_model(MODEL).tags[CONTRACT_TAG] == first[0]
    mv = registry.get_model_version(MODEL, other[0])
    run = registry.get_run(mv.run_id)
    for tags in (mv.tags, run.data.tags):
        assert tags["promotion.decision"] == "rejected" and tags["promotion.rule"] == "incompatible"
        assert tags["promotion.champion_version"] == first[0] and tags["promotion.champion_score"] == ""
        assert "target changed" in tags["promotion.contract_changes"]
    assert run.data.metrics["promotion_promoted"] == 0.0


def test_a_champion_that_cannot_be_loaded_is_never_an_absent_champion(registry, tmp_path):
    doomed = tmp_path / "doomed-artifacts"
    _experiment("doomed", doomed)
    first = _register("income")
    _gate(registry, first)
    _experiment("after", tmp_path / "after-artifacts")
    shutil.rmtree(doomed)  # the champion's artifact store is gone: it cannot be scored
    decision = _gate(registry, _register("income", seed=1))
    assert not decision.promote and decision.rule is Rule.UNSCORABLE
    assert decision.reason.startswith(f"champion v{first[0]} cannot be scored on this test set: it cannot be loaded")
    assert _champion(registry) == first[0]


def test_a_registry_that_fails_is_never_an_absent_champion(registry, monkeypatch):
    first = _register("income")
    _gate(registry, first)
    candidate = _register("income", seed=1)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with failing_registry() as broken, pytest.raises(MlflowException, match="500 error responses"):
        _gate(MlflowClient(broken), candidate)
    # Nothing moved and nothing was recorded as decided.
    assert _champion(registry) == first[0]
    assert "promotion.decision" not in registry.get_model_version(MODEL, candidate[0]).tags


def test_an_operator_approves_a_schema_change_by_name_and_reason(registry):
    first = _register("income")
    _gate(registry, first)
    other = _register("fleet")
    decision = _gate(registry, other, approval=Approval("alice@ops", "income model retired"))
    assert decision.promote and decision.rule is Rule.FORCED
    assert "contract changes approved: target changed" in decision.reason
    assert _champion(registry) == other[0]
    assert registry.get_registered_model(MODEL).tags[CONTRACT_TAG] == other[0]
    tags = registry.get_model_version(MODEL, other[0]).tags
    assert tags["promotion.forced_by"] == "alice@ops" and tags["promotion.force_reason"] == "income model retired"


def test_comparable_versions_are_decided_by_score(registry):
    first = _register("income")
    _gate(registry, first)
    decision = _gate(registry, _register("income", seed=3), margin=-1.0)  # any score beats it by -1
    assert decision.promote and decision.rule is Rule.SCORE and decision.champion_score is not None


def test_the_replica_follows_compatible_moves_and_refuses_others_until_approved(registry):
    first = _register("income")
    _gate(registry, first)
    current = load_version(registry, MODEL, first[0], None)
    assert poll_alias(registry, MODEL, ALIAS, current, None) == Poll()  # nothing moved

    other = _register("fleet")
    registry.set_registered_model_alias(MODEL, ALIAS, other[0])  # by hand, around the gate
    poll = poll_alias(registry, MODEL, ALIAS, current, None)
    assert poll.model is None and poll.refused is not None and poll.refused.version == other[0]
    assert poll.refused.reason.startswith(f"breaks the contract of version {first[0]}: ")
    assert poll_alias(registry, MODEL, ALIAS, current, poll.refused).refused is poll.refused

    # The alias moved back: nothing is refused any more.
    registry.set_registered_model_alias(MODEL, ALIAS, first[0])
    assert poll_alias(registry, MODEL, ALIAS, current, poll.refused) == Poll()

    # A compatible version moved by hand is followed.
    compatible = _register("income", seed=5)
    registry.set_registered_model_alias(MODEL, ALIAS, compatible[0])
    followed = poll_alias(registry, MODEL, ALIAS, current, None)
    assert followed.model is not None and followed.model.version == compatible[0] and followed.refused is None


def test_a_replica_starting_cold_serves_the_contract_in_force_not_a_hand_moved_alias(registry):
    first = _register("income")
    _gate(registry, first)
    other = _register("fleet")
    registry.set_registered_model_alias(MODEL, ALIAS, other[0])
    poll = poll_alias(registry, MODEL, ALIAS, None, None)
    assert poll.model is not None and poll.model.version == first[0]
    assert poll.refused is not None and poll.refused.version == other[0]

    # Approved by an operator, the new contract is served, warm or cold.
    registry.set_registered_model_alias(MODEL, ALIAS, first[0])
    _gate(registry, other, approval=Approval("alice@ops", "income model retired"))
    warm = poll_alias(registry, MODEL, ALIAS, poll.model, poll.refused)
    assert warm.model is not None and warm.model.version == other[0] and warm.refused is None
    cold = poll_alias(registry, MODEL, ALIAS, None, None)
    assert cold.model is not None and cold.model.version == other[0]


def test_a_shadow_candidate_becomes_the_challenger_and_a_rollback_is_followed(registry):
    """Real versions: under a shadow policy the champion (and what a replica serves) stays put while
    the candidate waits as the challenger; an immediate move and its rollback are followed."""
    from core.settings import Settings
    from jobs.rollout import CHALLENGER_ALIAS, POLICY_TAG, PREVIOUS_CHAMPION_TAG, policy_from_tag, rollback

    settings = Settings(mlflow={"tracking_uri": registry.tracking_uri}, database={"url": "postgresql://x@127.0.0.1/x"})
    first = _register("income")
    _gate(registry, first, settings=settings)
    current = load_version(registry, MODEL, first[0], None)

    version, predictor, config, frame = _register("income", seed=3)
    shadow = config.with_overrides({"promotion.rollout.mode": "shadow"})
    decision = gate(registry, MODEL, ALIAS, version, predictor, shadow, frame, margin=-1.0, settings=settings)
    assert decision.promote and decision.rollout == "shadow" and decision.rule is Rule.SCORE
    assert _champion(registry) == first[0]
    assert str(registry.get_model_version_by_alias(MODEL, CHALLENGER_ALIAS).version) == version
    policy = policy_from_tag(registry.get_model_version(MODEL, version).tags[POLICY_TAG])
    assert policy is not None and policy.mode == "shadow"
    run = registry.get_run(registry.get_model_version(MODEL, version).run_id)
    assert run.data.tags["promotion.decision"] == "challenger" and run.data.metrics["promotion_promoted"] == 0.0
    assert poll_alias(registry, MODEL, ALIAS, current, None) == Poll()  # replicas keep the champion

    registry.delete_registered_model_alias(MODEL, CHALLENGER_ALIAS)  # the rollout service's part
    moved = _gate(registry, (version, predictor, config, frame), margin=-1.0, settings=settings)
    assert moved.champion_moved and _champion(registry) == version
    assert registry.get_model_version(MODEL, version).tags[PREVIOUS_CHAMPION_TAG] == first[0]
    followed = poll_alias(registry, MODEL, ALIAS, current, None)
    assert followed.model is not None and followed.model.version == version

    assert rollback(registry, MODEL, ALIAS, "worse on live labels", "test", expected_current=version) == (
        version,
        first[0],
    )
    back = poll_alias(registry, MODEL, ALIAS, followed.model, None)
    assert back.model is not None and back.model.version == first[0] and back.refused is None
    assert registry.get_registered_model(MODEL).tags[CONTRACT_TAG] == first[0]


def test_a_rollback_to_the_contract_in_force_before_is_followed_without_an_approval(registry):
    """A promotion that changed the contract (approved by an operator) and is then rolled back:
    the replica serving the new contract goes back to the old one, the contract its clients had."""
    from jobs.rollout import rollback

    first = _register("income")
    _gate(registry, first)
    other = _register("fleet")
    _gate(registry, other, approval=Approval("alice@ops", "fleet model"))
    serving = load_version(registry, MODEL, other[0], None)
    assert rollback(registry, MODEL, ALIAS, "worse on live labels", "test", expected_current=other[0]) == (
        other[0],
        first[0],
    )
    back = poll_alias(registry, MODEL, ALIAS, serving, None)
    assert back.model is not None and back.model.version == first[0] and back.refused is None
    # The same move by hand, around the rollback, is still refused.
    registry.set_registered_model_alias(MODEL, ALIAS, other[0])
    registry.set_registered_model_alias(MODEL, ALIAS, first[0])
    registry.delete_model_version_tag(MODEL, first[0], "rollback.restored_from")
    refused = poll_alias(registry, MODEL, ALIAS, serving, None)
    assert refused.model is None and refused.refused is not None
