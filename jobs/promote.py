"""The promotion gate: a version becomes `champion` only if it beats the champion.

Both models are scored on the same held-out test set (the candidate's), so a champion trained on
another split is never compared by a number it computed itself. The gate fails closed: a champion
it cannot load or score, or a candidate that breaks the champion's serving contract, means
"rejected", never "no champion to beat". Only an operator overrides it, by name and with a reason
(`--force --reason`), and that approval is recorded on the version. The rules: docs/promotion.md.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import pandas as pd
import typer
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core.audit import Actor
from core.settings import Settings, get_settings
from jobs.compatibility import (
    CONTRACT_TAG,
    DECISION_TAG,
    FORCE_REASON_TAG,
    FORCED_BY_TAG,
    RULE_TAG,
    contract_changes,
)
from jobs.config import JobConfig
from jobs.data.loading import load_test_frame
from jobs.evaluate import evaluate, is_higher_better
from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor, run_config

# Who a promotion decision was made for, and who a promoted version's move is owed to.
DECIDED_FOR_TAG = "audit.decided_for"
PROMOTED_BY_TAG = "audit.promoted_by"
log = logging.getLogger(__name__)
# MLflow caps tag values (5,000 characters for model versions); reasons name columns and can be long.
MAX_TAG_CHARS = 4000
# Exit status of `jobs.promote` when nothing is promoted, and of `jobs.train`/`jobs.tune` when the
# gate refused to compare their candidate with the champion.
EXIT_NOT_PROMOTED = 3


class Rule(StrEnum):
    """Which rule of the gate decided."""

    NO_CHAMPION = "no_champion"  # promoted: the model has no champion yet
    SCORE = "score"  # promoted or rejected by comparing both scores
    FORCED = "forced"  # promoted by an operator's explicit, recorded act
    ALREADY_CHAMPION = "already_champion"  # nothing to do
    INCOMPATIBLE = "incompatible"  # rejected: the candidate breaks the champion's serving contract
    UNSCORABLE = "unscorable"  # rejected: the champion cannot be loaded or scored on the test set

    @property
    def refusal(self) -> bool:
        """The gate could not compare the two safely: the job that asked is told so (exit 3)."""
        return self in {Rule.INCOMPATIBLE, Rule.UNSCORABLE}


@dataclass(frozen=True)
class Approval:
    """An operator's explicit override of the gate: who, and why."""

    operator: str
    reason: str

    def __post_init__(self) -> None:
        if not self.reason.strip():
            raise ValueError("a forced promotion needs a reason (--reason)")


@dataclass(frozen=True)
class ChampionCheck:
    """What the gate found out about the current champion, next to the candidate."""

    version: str
    score: float | None = None
    changes: list[str] = field(default_factory=list)  # what the candidate changes in its contract
    problem: str | None = None  # why it could not be scored


@dataclass(frozen=True)
class Decision:
    promote: bool
    metric: str
    margin: float
    candidate_score: float
    champion_score: float | None
    champion_version: str | None
    reason: str
    rule: Rule = Rule.SCORE
    contract_changes: list[str] = field(default_factory=list)
    forced_by: str | None = None


def decide(
    metric: str,
    candidate: float,
    margin: float,
    champion: ChampionCheck | None,
    approval: Approval | None = None,
) -> Decision:
    """Promote when the candidate improves on a comparable champion by more than `margin`.

    The improvement is signed so that positive is better whichever way the metric points; a tie
    never promotes, so retraining on identical data does not churn the serving model.
    """
    version = champion.version if champion else None
    score = champion.score if champion else None
    changes = list(champion.changes) if champion else []

    def made(promote: bool, rule: Rule, reason: str) -> Decision:
        forced_by = approval.operator if rule is Rule.FORCED and approval else None
        return Decision(promote, metric, margin, candidate, score, version, reason, rule, changes, forced_by)

    if approval is not None:
        approved = f"; contract changes approved: {'; '.join(changes)}" if changes else ""
        return made(True, Rule.FORCED, f"forced by operator {approval.operator}: {approval.reason}{approved}")
    if champion is None:
        return made(True, Rule.NO_CHAMPION, "no champion to beat")
    if changes:
        broken = "; ".join(changes)
        return made(False, Rule.INCOMPATIBLE, f"candidate breaks the serving contract of champion v{version}: {broken}")
    if score is None:
        problem = champion.problem or "no score"
        return made(False, Rule.UNSCORABLE, f"champion v{version} cannot be scored on this test set: {problem}")
    improvement = candidate - score if is_higher_better(metric) else score - candidate
    promote = improvement > margin
    verb = "beats" if promote else "does not beat"
    return made(promote, Rule.SCORE, f"{metric} {candidate:.5f} {verb} champion {score:.5f} by more than {margin}")


def _metric_of(predictor: TabularPredictor, metric: str, test: pd.DataFrame) -> float:
    """The metric on `test`, or ValueError saying why there is none."""
    missing = sorted({*predictor.schema.feature_names, predictor.schema.target} - set(test.columns))
    if missing:
        raise ValueError(f"test set lacks columns {missing}")
    value = evaluate(predictor, test).get(metric)
    if value is None or not math.isfinite(value):
        raise ValueError(f"{metric} is not defined on this test set (got {value})")
    return value


def check_champion(
    client: MlflowClient, model_name: str, version: str, candidate: TabularPredictor, metric: str, test: pd.DataFrame
) -> ChampionCheck:
    """Load the champion, compare contracts, score it; every failure is a finding, never a pass."""
    try:
        champion = load_predictor(f"models:/{model_name}/{version}", client.tracking_uri)
    except Exception as exc:  # any failure to load means it cannot be compared
        return ChampionCheck(version, problem=f"it cannot be loaded ({type(exc).__name__}: {exc})")
    changes = contract_changes(champion.schema, candidate.schema)
    if changes:
        return ChampionCheck(version, changes=changes)
    try:
        return ChampionCheck(version, score=_metric_of(champion, metric, test))
    except Exception as exc:  # an error while scoring is as unsafe as a missing column
        return ChampionCheck(version, problem=f"{type(exc).__name__}: {exc}")


def gate(
    client: MlflowClient,
    model_name: str,
    alias: str,
    version: str,
    candidate: TabularPredictor,
    config: JobConfig,
    test: pd.DataFrame,
    margin: float | None = None,
    approval: Approval | None = None,
    actor: Actor | None = None,
) -> Decision:
    """Score candidate and champion on `test`, record the decision (and who it was made for),
    then move the alias if it says so."""
    metric = config.promotion_metric
    margin = config.promotion.margin if margin is None else margin
    try:
        candidate_score = _metric_of(candidate, metric, test)
    except ValueError as exc:
        raise ValueError(f"candidate version {version} cannot be scored with {metric}: {exc}") from exc
    current = champion_version(client, model_name, alias)
    if current is not None and str(current.version) == str(version):
        return Decision(
            False, metric, margin, candidate_score, candidate_score, version, "already champion", Rule.ALREADY_CHAMPION
        )
    champion = (
        None if current is None else check_champion(client, model_name, str(current.version), candidate, metric, test)
    )
    decision = decide(metric, candidate_score, margin, champion, approval)
    # Recorded before the alias moves: a replica that sees the move finds the approval already there.
    _record(client, model_name, version, decision, approval, actor)
    if decision.promote:
        client.set_registered_model_tag(model_name, CONTRACT_TAG, version)
        client.set_registered_model_alias(model_name, alias, version)
    level = logging.ERROR if decision.rule.refusal else logging.INFO
    by = actor.label() if actor is not None else "unknown"
    log.log(
        level,
        "promotion of %s v%s for %s: %s",
        model_name,
        version,
        by,
        decision.reason,
        extra={"actor": by, "model_name": model_name, "model_version": version, "promoted": decision.promote},
    )
    return decision


def decision_tags(decision: Decision, approval: Approval | None, actor: Actor | None = None) -> dict[str, str]:
    tags = {
        DECISION_TAG: "promoted" if decision.promote else "rejected",
        RULE_TAG: decision.rule.value,
        "promotion.reason": decision.reason[:MAX_TAG_CHARS],
        "promotion.metric": decision.metric,
        "promotion.candidate_score": f"{decision.candidate_score:.6f}",
        "promotion.champion_score": "" if decision.champion_score is None else f"{decision.champion_score:.6f}",
        "promotion.champion_version": decision.champion_version or "",
        "promotion.contract_changes": "; ".join(decision.contract_changes)[:MAX_TAG_CHARS],
    }
    if approval is not None:
        tags |= {FORCED_BY_TAG: approval.operator, FORCE_REASON_TAG: approval.reason[:MAX_TAG_CHARS]}
    if actor is not None:
        # The gate ran for this actor: the requester of the training job, or the operator of the CLI.
        tags |= {DECIDED_FOR_TAG: actor.label()}
        if decision.promote:
            tags |= {PROMOTED_BY_TAG: actor.label()}
    return tags


def _record(
    client: MlflowClient,
    model_name: str,
    version: str,
    decision: Decision,
    approval: Approval | None,
    actor: Actor | None,
) -> None:
    mv = client.get_model_version(model_name, version)
    tags = decision_tags(decision, approval, actor)
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    if mv.run_id:
        for key, value in tags.items():
            client.set_tag(mv.run_id, key, value)
        client.log_metric(mv.run_id, "promotion_promoted", float(decision.promote))
        client.log_metric(mv.run_id, "promotion_candidate_score", decision.candidate_score)
        if decision.champion_score is not None:
            client.log_metric(mv.run_id, "promotion_champion_score", decision.champion_score)


def operator_identity() -> str:
    """Who runs this CLI, as recorded on a forced version: user@host."""
    operator = Actor.operator()
    return f"{operator.user}@{operator.host}"


def promote_version(
    model_name: str,
    version: str,
    settings: Settings | None = None,
    margin: float | None = None,
    approval: Approval | None = None,
    actor: Actor | None = None,
) -> Decision:
    """Run the gate for an already registered version, using the config its run logged."""
    settings = settings or get_settings()
    client = MlflowClient(settings.mlflow.tracking_uri)
    mv = client.get_model_version(model_name, version)
    if not mv.run_id:
        raise ValueError(f"{model_name} version {version} has no run to read its config from")
    config = JobConfig.model_validate(run_config(client, mv.run_id))
    candidate = load_predictor(f"models:/{model_name}/{version}", settings.mlflow.tracking_uri)
    test = load_test_frame(config, settings)
    return gate(client, model_name, settings.champion_alias, version, candidate, config, test, margin, approval, actor)


def main(
    model: str = typer.Option(..., "--model", help="registered model name (a job config's `name`)"),
    version: str = typer.Option(..., "--version", help="registered model version to consider"),
    margin: float | None = typer.Option(None, help="override the config's margin"),
    force: bool = typer.Option(False, help="promote regardless of scores and schema (needs --reason)"),
    reason: str | None = typer.Option(None, help="why the operator forces this promotion (recorded)"),
) -> None:
    """Promote VERSION of MODEL to champion if it beats the current one on the held-out test set."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if force and not (reason and reason.strip()):
        raise typer.BadParameter("a forced promotion needs --reason TEXT (it is recorded on the version)")
    if reason and not force:
        raise typer.BadParameter("--reason only goes with --force")
    approval = Approval(operator_identity(), reason or "") if force else None
    try:
        decision = promote_version(model, version, margin=margin, approval=approval, actor=Actor.operator())
    except (MlflowException, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(json.dumps(asdict(decision)))
    if not decision.promote:
        typer.echo(f"not promoted: {decision.reason}", err=True)
        raise typer.Exit(code=EXIT_NOT_PROMOTED)


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
