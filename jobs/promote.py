"""The promotion gate: a version becomes `champion` only if it beats the champion.

Both models are scored on the same held-out test set (the candidate's), so a champion trained on
another split is never compared by a number it computed itself; a job that trained on feedback
also scores both on its recent feedback slice, and `promotion.recent_rule` says how the two
comparisons decide. The gate fails closed: a champion
it cannot load or score, or a candidate that breaks the champion's serving contract, means
"rejected", never "no champion to beat". Only an operator overrides it, by name and with a reason
(`--force --reason`), and that approval is recorded on the version. The rules: docs/promotion.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

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
from jobs.config import JobConfig, RecentRule
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
    UNSCORABLE = "unscorable"  # rejected: the champion (or a slice) cannot be scored: nothing to compare

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
    recent_score: float | None = None  # on the recent feedback slice, when there is one
    recent_problem: str | None = None  # why it could not be scored on that slice


@dataclass(frozen=True)
class RecentSlice:
    """The candidate on the most recent labelled feedback, held out of its training."""

    rows: int
    score: float | None  # None: the metric is not defined on the slice (`problem` says why)
    problem: str | None = None


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
    # With a recent feedback slice: both scores on it, its rows, and the rule that weighed it.
    recent_candidate_score: float | None = None
    recent_champion_score: float | None = None
    recent_rows: int | None = None
    recent_rule: RecentRule | None = None


def improvement(metric: str, candidate: float, champion: float) -> float:
    """How much better the candidate is, positive whichever way the metric points."""
    return candidate - champion if is_higher_better(metric) else champion - candidate


def decide(
    metric: str,
    candidate: float,
    margin: float,
    champion: ChampionCheck | None,
    approval: Approval | None = None,
    recent: RecentSlice | None = None,
    recent_rule: RecentRule = "recent_and_test",
    test_tolerance: float = 0.02,
) -> Decision:
    """Promote when the candidate improves on a comparable champion by more than `margin`.

    The improvement is signed so that positive is better whichever way the metric points; a tie
    never promotes, so retraining on identical data does not churn the serving model. With a
    `recent` slice, `recent_rule` decides which comparisons count (docs/promotion.md); without one,
    the test split alone decides, whatever the rule.
    """
    version = champion.version if champion else None
    score = champion.score if champion else None
    changes = list(champion.changes) if champion else []
    recent_fields: dict[str, Any] = {}
    if recent is not None:
        recent_fields = {
            "recent_candidate_score": recent.score,
            "recent_champion_score": champion.recent_score if champion else None,
            "recent_rows": recent.rows,
            "recent_rule": recent_rule,
        }

    def made(promote: bool, rule: Rule, reason: str) -> Decision:
        forced_by = approval.operator if rule is Rule.FORCED and approval else None
        return Decision(
            promote, metric, margin, candidate, score, version, reason, rule, changes, forced_by, **recent_fields
        )

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
    if recent is not None and recent.score is None and recent_rule != "test_only":
        # The slice itself cannot be scored (ROC AUC on labels of one class, say): it cannot
        # decide either way, so the test split's rule alone does, and the reason says so.
        promote = improvement(metric, candidate, score) > margin
        verb = "beats" if promote else "does not beat"
        problem = recent.problem or "no score"
        return made(
            promote,
            Rule.SCORE,
            f"{metric} {candidate:.5f} {verb} champion {score:.5f} by more than {margin} "
            f"(the recent slice ({recent.rows} rows) cannot decide: {problem})",
        )
    if recent is None or recent_rule == "test_only":
        promote = improvement(metric, candidate, score) > margin
        verb = "beats" if promote else "does not beat"
        reason = f"{metric} {candidate:.5f} {verb} champion {score:.5f} by more than {margin}"
        if recent is not None:
            champion_recent = _shown(champion.recent_score)
            reason += (
                f" (test_only; on the recent slice ({recent.rows} rows) {_shown(recent.score)}, "
                f"champion {champion_recent}, not deciding)"
            )
        return made(promote, Rule.SCORE, reason)
    return _decide_with_recent(metric, candidate, score, margin, champion, recent, recent_rule, test_tolerance, made)


def _shown(score: float | None) -> str:
    return "unscored" if score is None else f"{score:.5f}"


def _decide_with_recent(
    metric: str,
    candidate: float,
    score: float,
    margin: float,
    champion: ChampionCheck,
    recent: RecentSlice,
    recent_rule: RecentRule,
    test_tolerance: float,
    made: Callable[[bool, Rule, str], Decision],
) -> Decision:
    """`recent_and_test` and `recent_only`: the recent slice must show the candidate better."""
    on_slice = f"the recent slice ({recent.rows} rows)"
    assert recent.score is not None  # a slice the candidate cannot be scored on does not decide (decide)
    if champion.recent_score is None:
        problem = champion.recent_problem or "no score"
        return made(False, Rule.UNSCORABLE, f"champion v{champion.version} cannot be scored on {on_slice}: {problem}")
    gained = improvement(metric, recent.score, champion.recent_score)
    beats = gained > margin
    verb = "beats" if beats else "does not beat"
    recent_part = (
        f"{metric} on {on_slice} {recent.score:.5f} {verb} champion {champion.recent_score:.5f} by more than {margin}"
    )
    test_part = f"{metric} on the test split {candidate:.5f}, champion {score:.5f}"
    if recent_rule == "recent_only":
        return made(beats, Rule.SCORE, f"{recent_part} (recent_only; {test_part}, not deciding)")
    within = improvement(metric, candidate, score) >= -test_tolerance
    worse = "not worse" if within else "worse"
    reason = f"{recent_part}; {test_part}: {worse} by more than the tolerance {test_tolerance}"
    return made(beats and within, Rule.SCORE, reason)


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
    client: MlflowClient,
    model_name: str,
    version: str,
    candidate: TabularPredictor,
    metric: str,
    test: pd.DataFrame,
    recent: pd.DataFrame | None = None,
) -> ChampionCheck:
    """Load the champion, compare contracts, score it (on `recent` too, when given); every failure
    is a finding, never a pass."""
    try:
        champion = load_predictor(f"models:/{model_name}/{version}", client.tracking_uri)
    except Exception as exc:  # any failure to load means it cannot be compared
        return ChampionCheck(version, problem=f"it cannot be loaded ({type(exc).__name__}: {exc})")
    changes = contract_changes(champion.schema, candidate.schema)
    if changes:
        return ChampionCheck(version, changes=changes)
    try:
        score = _metric_of(champion, metric, test)
    except Exception as exc:  # an error while scoring is as unsafe as a missing column
        return ChampionCheck(version, problem=f"{type(exc).__name__}: {exc}")
    if recent is None:
        return ChampionCheck(version, score=score)
    try:
        return ChampionCheck(version, score=score, recent_score=_metric_of(champion, metric, recent))
    except Exception as exc:
        return ChampionCheck(version, score=score, recent_problem=f"{type(exc).__name__}: {exc}")


def score_recent(candidate: TabularPredictor, metric: str, recent: pd.DataFrame | None) -> RecentSlice | None:
    """The candidate on the recent slice; None without one (no slice, or an empty one). A metric
    the slice cannot define (one class only, for ROC AUC) is recorded as the problem, not raised:
    the model trained fine, and the rule decides what an unscorable slice means."""
    if recent is None or recent.empty:
        return None
    try:
        return RecentSlice(len(recent), _metric_of(candidate, metric, recent))
    except Exception as exc:  # as for the champion: whatever stops the scoring is the finding
        return RecentSlice(len(recent), None, f"{type(exc).__name__}: {exc}")


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
    recent: pd.DataFrame | None = None,
) -> Decision:
    """Score candidate and champion on `test` (and on the `recent` feedback slice, held out of the
    candidate's training, when the job has one), record the decision (and who it was made for),
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
    on_slice = score_recent(candidate, metric, recent)
    slice_frame = recent if on_slice is not None else None
    champion = (
        None
        if current is None
        else check_champion(client, model_name, str(current.version), candidate, metric, test, slice_frame)
    )
    rule, tolerance = config.promotion.recent_rule, config.promotion.test_tolerance
    decision = decide(metric, candidate_score, margin, champion, approval, on_slice, rule, tolerance)
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
    if decision.recent_rows is not None:
        tags |= {
            "promotion.recent_rule": decision.recent_rule or "",
            "promotion.recent_rows": str(decision.recent_rows),
            "promotion.recent_candidate_score": _score_tag(decision.recent_candidate_score),
            "promotion.recent_champion_score": _score_tag(decision.recent_champion_score),
        }
    if approval is not None:
        tags |= {FORCED_BY_TAG: approval.operator, FORCE_REASON_TAG: approval.reason[:MAX_TAG_CHARS]}
    if actor is not None:
        # The gate ran for this actor: the requester of the training job, or the operator of the CLI.
        tags |= {DECIDED_FOR_TAG: actor.label()}
        if decision.promote:
            tags |= {PROMOTED_BY_TAG: actor.label()}
    return tags


def _score_tag(score: float | None) -> str:
    return "" if score is None else f"{score:.6f}"


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
        recent: dict[str, float | None] = {
            "promotion_recent_rows": None if decision.recent_rows is None else float(decision.recent_rows),
            "promotion_recent_candidate_score": decision.recent_candidate_score,
            "promotion_recent_champion_score": decision.recent_champion_score,
        }
        for name, figure in recent.items():
            if figure is not None:
                client.log_metric(mv.run_id, name, figure)


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
    """Run the gate for an already registered version, using the config its run logged. The test
    split alone decides: the recent feedback slice was the training job's, and is not kept."""
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
