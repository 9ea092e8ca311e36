"""The promotion gate: a version becomes `champion` only if it beats the champion.

Both models are scored on the same held-out test set (the candidate's), so a champion trained on
another split is never compared by a number it computed itself; a job that trained on feedback
also scores both on its recent feedback slice, and `promotion.recent_rule` says how the two
comparisons decide. The gate fails closed: a champion
it cannot load or score, or a candidate that breaks the champion's serving contract, means
"rejected", never "no champion to beat". Only an operator overrides it, by name and with a reason
(`--force --reason`), and that approval is recorded on the version. Under a shadow or canary
rollout policy a candidate that passes becomes the `challenger`, and the rollout service decides
(jobs/rollout.py). The rules: docs/promotion.md; the rollouts: docs/rollout.md.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, get_args

import pandas as pd
import typer
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from core.audit import Actor
from core.settings import Settings, get_settings
from jobs.compatibility import (
    DECISION_TAG,
    FORCE_REASON_TAG,
    FORCED_BY_TAG,
    MAX_TAG_CHARS,
    RULE_TAG,
    contract_changes,
)
from jobs.config import JobConfig, RecentRule, RolloutMode, RolloutPolicy
from jobs.data.loading import load_test_frame
from jobs.evaluate import evaluate, is_higher_better
from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor, run_config
from jobs.rollout import (
    CHALLENGER_ALIAS,
    JOB_TAG,
    POLICY_TAG,
    REQUESTED_AT_TAG,
    alias_version,
    move_champion,
    policy_tag,
    rollback,
)

# Who a promotion decision was made for, and who a promoted version's move is owed to.
DECIDED_FOR_TAG = "audit.decided_for"
PROMOTED_BY_TAG = "audit.promoted_by"
# How the candidate that passed reaches the clients: "immediate", or the mode it was handed over in.
ROLLOUT_TAG = "promotion.rollout"
log = logging.getLogger(__name__)
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
    ROLLOUT_BUSY = "rollout_busy"  # not rolled out: another version's shadow or canary rollout is under way
    NO_ROLLOUT_SERVICE = "no_rollout_service"  # not rolled out: nothing would ever judge the challenger

    @property
    def refusal(self) -> bool:
        """The gate could not compare the two, or act on its comparison, safely: the job that asked
        is told so (exit 3)."""
        return self in {Rule.INCOMPATIBLE, Rule.UNSCORABLE, Rule.ROLLOUT_BUSY, Rule.NO_ROLLOUT_SERVICE}


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
class RolloutContext:
    """How a candidate that passes on its scores reaches the clients, and whether it can: the
    config's mode, the version the `challenger` alias already names (another rollout under way),
    and why no rollout service would judge a challenger (None: one will)."""

    mode: RolloutMode = "immediate"
    challenger: str | None = None
    service_problem: str | None = None


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
    # A candidate that passed under a shadow or canary policy: the mode it was handed to the
    # rollout service in (it is the `challenger`, the champion did not move). None: immediate.
    rollout: str | None = None

    @property
    def champion_moved(self) -> bool:
        """Whether the gate itself made the candidate the champion."""
        return self.promote and self.rollout is None

    @property
    def label(self) -> str:
        """What became of the candidate, as recorded (`promotion.decision`)."""
        if not self.promote:
            return "rejected"
        return "promoted" if self.rollout is None else "challenger"


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
    rollout: RolloutContext | None = None,
) -> Decision:
    """Promote when the candidate improves on a comparable champion by more than `margin`.

    The improvement is signed so that positive is better whichever way the metric points; a tie
    never promotes, so retraining on identical data does not churn the serving model. With a
    `recent` slice, `recent_rule` decides which comparisons count (docs/promotion.md); without one,
    the test split alone decides, whatever the rule. Under a shadow or canary `rollout`, a
    candidate that wins on its scores is handed over as the challenger (see `hand_over`).
    """
    scored = _decide_scores(metric, candidate, margin, champion, approval, recent, recent_rule, test_tolerance)
    return hand_over(scored, rollout or RolloutContext())


def hand_over(decision: Decision, rollout: RolloutContext) -> Decision:
    """A candidate promoted on its scores under a shadow or canary policy becomes the challenger
    instead of the champion, if a rollout service will judge it and no other rollout is under way;
    otherwise it is refused (fail closed: promoting it at once would skip the policy). A first
    version and an operator's forced promotion are always immediate: there is nothing to compare
    live traffic with, or an operator decided."""
    if not decision.promote or decision.rule is not Rule.SCORE or rollout.mode == "immediate":
        return decision
    mode = rollout.mode
    if rollout.service_problem is not None:
        reason = f"no rollout service would judge a {mode} challenger: {rollout.service_problem} ({decision.reason})"
        return replace(decision, promote=False, rule=Rule.NO_ROLLOUT_SERVICE, reason=reason)
    if rollout.challenger is not None:
        reason = f"a rollout of version {rollout.challenger} is in progress ({decision.reason})"
        return replace(decision, promote=False, rule=Rule.ROLLOUT_BUSY, reason=reason)
    reason = f"{decision.reason}; rolled out as a {mode} challenger (the rollout service decides)"
    return replace(decision, rollout=mode, reason=reason)


def _decide_scores(
    metric: str,
    candidate: float,
    margin: float,
    champion: ChampionCheck | None,
    approval: Approval | None,
    recent: RecentSlice | None,
    recent_rule: RecentRule,
    test_tolerance: float,
) -> Decision:
    """The decision on scores and contracts alone, as if every promotion were immediate."""
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
    settings: Settings | None = None,
) -> Decision:
    """Score candidate and champion on `test` (and on the `recent` feedback slice, held out of the
    candidate's training, when the job has one), record the decision (and who it was made for),
    then move the alias if it says so, or hand the candidate to the rollout service as the
    challenger under a shadow or canary policy."""
    settings = settings or get_settings()
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
    rollout = rollout_context(client, model_name, version, config.promotion.rollout.mode, settings)
    decision = decide(metric, candidate_score, margin, champion, approval, on_slice, rule, tolerance, rollout)
    # Recorded before the alias moves: a replica that sees the move finds the approval already there.
    _record(client, model_name, version, decision, approval, actor)
    if decision.champion_moved:
        move_champion(client, model_name, alias, version, None if current is None else str(current.version))
    elif decision.promote:
        _hand_over_to_service(client, model_name, version, config.promotion.rollout, settings)
    level = logging.ERROR if decision.rule.refusal else logging.INFO
    by = actor.label() if actor is not None else "unknown"
    log.log(
        level,
        "promotion of %s v%s for %s: %s",
        model_name,
        version,
        by,
        decision.reason,
        extra={
            "actor": by,
            "model_name": model_name,
            "model_version": version,
            "promoted": decision.champion_moved,
            "rollout": decision.rollout,
        },
    )
    return decision


def rollout_context(
    client: MlflowClient, model_name: str, version: str, mode: RolloutMode, settings: Settings
) -> RolloutContext:
    """What `hand_over` needs to know about the registry and this process's settings."""
    if mode == "immediate":
        return RolloutContext()
    problem = None
    if settings.database.url is None:
        problem = "DATABASE_URL is not set (the rollout service keeps its state in PostgreSQL)"
    elif not settings.rollout.enabled:
        problem = "ROLLOUT_ENABLED is false"
    current = alias_version(client, model_name, CHALLENGER_ALIAS)
    # The gate run again for the challenger itself is no other rollout.
    busy = None if current is None or str(current.version) == str(version) else str(current.version)
    return RolloutContext(mode, busy, problem)


def _hand_over_to_service(
    client: MlflowClient, model_name: str, version: str, policy: RolloutPolicy, settings: Settings
) -> None:
    """The policy, when, and for which job on the version, then the `challenger` alias (last: the
    service adopts a challenger by its alias and reads the policy from it)."""
    tags = {
        POLICY_TAG: policy_tag(policy),
        REQUESTED_AT_TAG: datetime.now(UTC).isoformat(),
        JOB_TAG: settings.training.job_id or "",
    }
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, value)
    client.set_registered_model_alias(model_name, CHALLENGER_ALIAS, version)


def decision_tags(decision: Decision, approval: Approval | None, actor: Actor | None = None) -> dict[str, str]:
    tags = {
        DECISION_TAG: decision.label,
        RULE_TAG: decision.rule.value,
        ROLLOUT_TAG: (decision.rollout or "immediate") if decision.promote else "",
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
        if decision.champion_moved:
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
        # 1 only when the alias moved: a challenger is not (yet) promoted.
        client.log_metric(mv.run_id, "promotion_promoted", float(decision.champion_moved))
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


def with_rollout_mode(config: JobConfig, mode: RolloutMode | None) -> JobConfig:
    """`config` with its rollout mode replaced (the rest of its policy kept); unchanged for None."""
    if mode is None:
        return config
    policy = config.promotion.rollout.model_copy(update={"mode": mode})
    return config.model_copy(update={"promotion": config.promotion.model_copy(update={"rollout": policy})})


def promote_version(
    model_name: str,
    version: str,
    settings: Settings | None = None,
    margin: float | None = None,
    approval: Approval | None = None,
    actor: Actor | None = None,
    rollout: RolloutMode | None = None,
) -> Decision:
    """Run the gate for an already registered version, using the config its run logged (with
    `rollout` as its rollout mode, when given). The test split alone decides: the recent feedback
    slice was the training job's, and is not kept."""
    settings = settings or get_settings()
    client = MlflowClient(settings.mlflow.tracking_uri)
    mv = client.get_model_version(model_name, version)
    if not mv.run_id:
        raise ValueError(f"{model_name} version {version} has no run to read its config from")
    config = with_rollout_mode(JobConfig.model_validate(run_config(client, mv.run_id)), rollout)
    candidate = load_predictor(f"models:/{model_name}/{version}", settings.mlflow.tracking_uri)
    test = load_test_frame(config, settings)
    return gate(
        client,
        model_name,
        settings.champion_alias,
        version,
        candidate,
        config,
        test,
        margin,
        approval,
        actor,
        settings=settings,
    )


def rollback_champion(model_name: str, reason: str, settings: Settings | None = None) -> tuple[str, str]:
    """An operator's rollback: the champion goes back to the version it replaced; (from, to)."""
    settings = settings or get_settings()
    client = MlflowClient(settings.mlflow.tracking_uri)
    moved = rollback(client, model_name, settings.champion_alias, reason, by=operator_identity())
    log.info(
        "rollback of %s from v%s to v%s by %s: %s",
        model_name,
        *moved,
        operator_identity(),
        reason,
        extra={"model_name": model_name, "model_version": moved[1], "rolled_back": moved[0]},
    )
    return moved


def _rollout_mode(value: str | None) -> RolloutMode | None:
    modes: tuple[RolloutMode, ...] = get_args(RolloutMode)
    if value is None:
        return None
    for mode in modes:
        if value == mode:
            return mode
    raise typer.BadParameter(f"--rollout is one of {', '.join(modes)}, not {value!r}")


def _check_arguments(version: str | None, force: bool, reason: str | None, rollback: bool, changes: bool) -> None:
    """The combinations the CLI accepts; anything else is a usage error (exit 2)."""
    given = bool(reason and reason.strip())
    if rollback:
        if version is not None or force or changes:
            raise typer.BadParameter("--rollback takes --model and --reason only (it restores the previous champion)")
        if not given:
            raise typer.BadParameter("a rollback needs --reason TEXT (it is recorded on both versions)")
        return
    if version is None:
        raise typer.BadParameter("--version is required (or --rollback to restore the previous champion)")
    if force and not given:
        raise typer.BadParameter("a forced promotion needs --reason TEXT (it is recorded on the version)")
    if reason and not force:
        raise typer.BadParameter("--reason only goes with --force or --rollback")


def main(
    model: str = typer.Option(..., "--model", help="registered model name (a job config's `name`)"),
    version: str | None = typer.Option(None, "--version", help="registered model version to consider"),
    margin: float | None = typer.Option(None, help="override the config's margin"),
    force: bool = typer.Option(False, help="promote regardless of scores and schema (needs --reason)"),
    reason: str | None = typer.Option(
        None, help="why the operator forces this promotion, or rolls back (recorded on the versions)"
    ),
    rollout: str | None = typer.Option(
        None, "--rollout", help="immediate|shadow|canary: override the config's rollout mode for this run"
    ),
    rollback_: bool = typer.Option(
        False, "--rollback", help="move the champion back to the version it replaced (needs --reason)"
    ),
) -> None:
    """Promote VERSION of MODEL to champion if it beats the current one on the held-out test set;
    or, with --rollback, move MODEL's champion back to the version it replaced."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    mode = _rollout_mode(rollout)
    _check_arguments(version, force, reason, rollback_, changes=margin is not None or mode is not None)
    if rollback_:
        try:
            moved_from, restored = rollback_champion(model, reason or "")
        except (MlflowException, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=1) from None
        typer.echo(json.dumps({"rolled_back": moved_from, "restored": restored}))
        return
    assert version is not None  # _check_arguments
    approval = Approval(operator_identity(), reason or "") if force else None
    try:
        decision = promote_version(
            model, version, margin=margin, approval=approval, actor=Actor.operator(), rollout=mode
        )
    except (MlflowException, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    typer.echo(json.dumps(asdict(decision)))
    if not decision.promote:
        typer.echo(f"not promoted: {decision.reason}", err=True)
        raise typer.Exit(code=EXIT_NOT_PROMOTED)
    if decision.rollout is not None:
        typer.echo(f"challenger, not yet champion: {decision.reason}", err=True)


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
