"""The rollout service (docs/rollout.md): one loop, run by the dispatcher, that owns every shadow,
canary and probation.

Every ROLLOUT_REFRESH_S the leader (`Leadership`: one across dispatchers) looks at the registry's
aliases and the rollouts' records and, per model:

- tracks the champion: a new one (not a rollback's restored version) starts a probation against
  the version it replaced;
- judges the active probation on live figures and rolls back on a breach;
- adopts a new `challenger` alias as a shadow or canary rollout (its policy is tagged on it);
- judges the active rollout on the paired rows of its window, and moves it on: the next canary
  step, the promotion, or the rejection.

The registry is acted on first and the record written after: a record that could not be written
is recovered on the next tick from what the registry shows (the tags the action left). A failure
of the registry or the database leaves everything as it was, to be tried again next tick (fail
closed), and a failure with one model never holds up the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal
from uuid import UUID

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from core.settings import Settings
from jobs.config import RolloutPolicy
from jobs.rollout import (
    CHALLENGER_ALIAS,
    DECISION_REASON_TAG,
    JOB_TAG,
    POLICY_TAG,
    PREVIOUS_CHAMPION_TAG,
    REQUESTED_AT_TAG,
    RESTORED_FROM_TAG,
    ROLLED_BACK_TAG,
    STATE_TAG,
    alias_version,
    policy_from_tag,
    promote_challenger,
    reject_challenger,
    rollback,
)
from services.feedback.store import FeedbackStore
from services.rollout.metrics import RolloutMetrics
from services.rollout.models import RolloutRecord, RolloutState
from services.rollout.policy import (
    Action,
    ProbationAction,
    ProbationRule,
    WindowRule,
    paired_document,
    probation_decision,
    probation_windows,
    rollout_decision,
    window_document,
)
from services.rollout.store import ChampionSeen, Leadership, RolloutStore
from services.training_jobs.store import JobStore

log = logging.getLogger(__name__)

# Who a rollback by the service is recorded as (ROLLED_BACK_TAG's "by").
SERVICE_IDENTITY = "rollout-service"


@dataclass(frozen=True)
class ModelAliases:
    """A registered model and the versions its champion and challenger aliases name."""

    name: str
    champion: str | None
    challenger: str | None


class Registry:
    """The registry as the service uses it: blocking MLflow calls, run in threads by the controller."""

    def __init__(self, tracking_uri: str, champion_alias: str) -> None:
        self.client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        self.champion_alias = champion_alias

    def models(self) -> list[ModelAliases]:
        found: list[ModelAliases] = []
        token: str | None = None
        while True:
            page = self.client.search_registered_models(max_results=100, page_token=token)
            for model in page:
                aliases = {str(k): str(v) for k, v in (model.aliases or {}).items()}
                found.append(ModelAliases(model.name, aliases.get(self.champion_alias), aliases.get(CHALLENGER_ALIAS)))
            token = page.token
            if not token:
                return found

    def exists(self, model_name: str) -> bool:
        """False only when the registry says the model is gone; any other failure raises."""
        try:
            self.client.get_registered_model(model_name)
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return False
            raise
        return True

    def tags(self, model_name: str, version: str) -> dict[str, str]:
        """A version's tags; none for a version the registry says was deleted (its records end on
        what the aliases show), while any other failure raises."""
        try:
            return dict(self.client.get_model_version(model_name, version).tags or {})
        except MlflowException as exc:
            if exc.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return {}
            raise

    def remove_challenger(self, model_name: str, version: str) -> None:
        """Remove the challenger alias while it still names `version`."""
        current = alias_version(self.client, model_name, CHALLENGER_ALIAS)
        if current is not None and str(current.version) == str(version):
            self.client.delete_registered_model_alias(model_name, CHALLENGER_ALIAS)

    def promote(self, model_name: str, version: str, reason: str, figures: dict[str, Any]) -> str | None:
        return promote_challenger(self.client, model_name, self.champion_alias, version, reason, figures)

    def reject(self, model_name: str, version: str, reason: str, figures: dict[str, Any]) -> None:
        reject_challenger(self.client, model_name, version, reason, figures)

    def rollback(self, model_name: str, expected: str, reason: str, figures: dict[str, Any]) -> tuple[str, str]:
        return rollback(
            self.client, model_name, self.champion_alias, reason, SERVICE_IDENTITY, figures, expected_current=expected
        )


def _seconds(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds())


def _rolled_back_record(tags: dict[str, str]) -> dict[str, Any] | None:
    try:
        value = json.loads(tags.get(ROLLED_BACK_TAG) or "null")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class RolloutController:
    def __init__(
        self,
        settings: Settings,
        store: RolloutStore,
        feedback: FeedbackStore,
        jobs: JobStore | None,
        registry: CollectorRegistry,
        *,
        leadership: Leadership | None = None,
        models: Registry | None = None,
    ) -> None:
        if settings.database.url is None:
            raise RuntimeError("the rollout service needs DATABASE_URL")
        self.settings = settings
        self.store = store
        self.feedback = feedback
        self.jobs = jobs
        self.metrics = RolloutMetrics(registry)
        self.leadership = leadership or Leadership(settings.database.url.get_secret_value())
        self.registry = models or Registry(settings.mlflow.tracking_uri, settings.champion_alias)
        self._alias = settings.champion_alias

    # Lifecycle ---------------------------------------------------------------------------------

    async def prepare(self) -> None:
        """Open the stores and wait until their tables are up to date (the database may come later)."""
        await self.store.open()
        await self.feedback.open()
        while True:
            try:
                await self.store.migrate()
                await self.feedback.migrate()
                return
            except Exception as exc:
                log.warning("rollout tables not ready (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(self.settings.rollout.refresh_s)

    async def run(self) -> None:
        await self.prepare()
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("rollout service: tick failed (%s: %s); retrying", type(exc).__name__, exc)
            await asyncio.sleep(self.settings.rollout.refresh_s)

    async def close(self) -> None:
        """Give up the leadership and close the service's own store (the feedback and job stores
        belong to their owner)."""
        self.metrics.clear()
        await self.leadership.release()
        await self.store.close()

    # One tick ----------------------------------------------------------------------------------

    async def tick(self) -> bool:
        """One round over every registered model; False when another process leads."""
        if not await self.leadership.hold():
            self.metrics.clear()
            return False
        now = await self.store.clock()
        models = await asyncio.to_thread(self.registry.models)
        active = await self.store.active()
        seen = await self.store.champions()
        rollouts = {r.model_name: r for r in active if r.kind != "probation"}
        probations = {r.model_name: r for r in active if r.kind == "probation"}
        for model in models:
            try:
                await self._model(
                    model, now, rollouts.get(model.name), probations.get(model.name), seen.get(model.name)
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "rollout service: %s not handled this tick (%s: %s); retried next tick",
                    model.name,
                    type(exc).__name__,
                    exc,
                    exc_info=not isinstance(exc, OSError),
                )
        registered = {m.name for m in models}
        for record in active:
            if record.model_name not in registered:
                await self._end_unregistered(record)
        self.metrics.publish(await self.store.active(), await self.store.latest_rollbacks())
        return True

    async def _model(
        self,
        model: ModelAliases,
        now: datetime,
        rollout: RolloutRecord | None,
        probation: RolloutRecord | None,
        seen: ChampionSeen | None,
    ) -> None:
        probation = await self._track_champion(model, probation, seen)
        if probation is not None and await self._judge_probation(model, probation, now):
            # The champion just went back: the aliases read at the start of the tick are stale,
            # so the model's rollout is looked at next tick, against the registry as it is then.
            return
        if rollout is not None:
            followed = await self._follow_rollout(model, rollout)
            if followed is not None:
                await self._judge_rollout(model, followed, now)
                return
            if model.challenger == rollout.challenger_version:
                return  # ended with its challenger, whose alias went with it
        if model.challenger is not None:
            await self._adopt(model)

    # Champion and probation --------------------------------------------------------------------

    async def _track_champion(
        self, model: ModelAliases, probation: RolloutRecord | None, seen: ChampionSeen | None
    ) -> RolloutRecord | None:
        """End a probation whose champion moved, start one for a new champion; returns the
        probation still active."""
        name, champion = model.name, model.champion
        if probation is not None and champion != probation.challenger_version:
            await self._probation_superseded(model, probation)
            probation = None
        if champion is None or (seen is not None and seen.version == champion):
            return probation
        if seen is None:  # first sight of the model: nothing to compare with
            await self.store.record_champion(name, champion, None)
            log.info("rollout service: %s champion v%s", name, champion)
            return probation
        tags = await asyncio.to_thread(self.registry.tags, name, champion)
        previous = tags.get(PREVIOUS_CHAMPION_TAG) or None
        if RESTORED_FROM_TAG in tags:
            log.info("rollout service: %s champion v%s restored (from v%s)", name, champion, tags[RESTORED_FROM_TAG])
        elif previous is None or previous == champion:
            log.info("rollout service: %s champion v%s records no previous champion: no probation", name, champion)
        elif self.settings.probation.enabled and probation is None:
            probation = await self.store.start(
                name,
                "probation",
                previous,
                champion,
                job_id=tags.get(JOB_TAG) or None,
                message=(
                    f"v{champion} replaced v{previous} as {self._alias}: on probation for"
                    f" {self.settings.probation.window_s:.0f} s"
                ),
            )
            if probation is not None:
                log.info("rollout service: %s v%s on probation against v%s", name, champion, previous)
                await self._annotate(probation, f"probation of {name} v{champion} against v{previous} started")
        await self.store.record_champion(name, champion, seen.version)
        return probation

    async def _probation_superseded(self, model: ModelAliases, probation: RolloutRecord) -> None:
        """The champion on probation is no longer champion. Left by the service's own rollback whose
        record was not written: recorded as that rollback; otherwise the alias moved by other hands."""
        new, previous = probation.challenger_version, probation.champion_version
        tags = await asyncio.to_thread(self.registry.tags, model.name, new)
        rolled = _rolled_back_record(tags)
        if model.champion == previous and rolled is not None and str(rolled.get("to")) == previous:
            if rolled.get("by") == SERVICE_IDENTITY:
                figures = rolled.get("figures") if isinstance(rolled.get("figures"), dict) else None
                await self._decided(probation, RolloutState.ROLLED_BACK, str(rolled.get("reason") or ""), figures)
                return
            reason = f"rolled back by hand to v{previous} by {rolled.get('by')}: {rolled.get('reason')}"
        elif model.champion is None:
            reason = f"the {self._alias} alias was removed"
        else:
            reason = f"{self._alias} moved from v{new} to v{model.champion} by other hands"
        await self._decided(probation, RolloutState.ENDED, reason)

    async def _judge_probation(self, model: ModelAliases, probation: RolloutRecord, now: datetime) -> bool:
        """Judge a probation on its figures so far; True when the champion was rolled back."""
        if not self.settings.probation.enabled:
            await self._decided(probation, RolloutState.ENDED, "probation is disabled (PROBATION_ENABLED=false)")
            return False
        rule = ProbationRule.of(self.settings.probation)
        new, previous = probation.challenger_version, probation.champion_version
        elapsed = _seconds(now, probation.started_at)
        length = timedelta(seconds=probation_windows(elapsed, rule))
        start = probation.started_at
        new_window = await self.feedback.version_window(model.name, new, start, start + length)
        previous_window = await self.feedback.version_window(model.name, previous, start - length, start)
        basis_seen = bool(probation.figures.get("basis_seen"))
        decision = probation_decision(
            new_window, previous_window, elapsed, rule, basis_seen, new_name=f"v{new}", previous_name=f"v{previous}"
        )
        figures = {
            "elapsed_s": round(elapsed, 3),
            "window_s": rule.window_s,
            "compared_s": round(length.total_seconds(), 3),
            "basis": decision.basis,
            "basis_seen": basis_seen or decision.basis is not None,
            "drop": decision.drop,
            "max_drop": rule.max_drop,
            "new_version": new,
            "previous_version": previous,
            "new": window_document(new_window),
            "previous": window_document(previous_window),
        }
        if decision.action is ProbationAction.CONTINUE:
            await self.store.save_figures(probation.id, figures)
            return False
        if decision.action is ProbationAction.ROLL_BACK:
            try:
                await asyncio.to_thread(self.registry.rollback, model.name, new, decision.reason, figures)
            except ValueError as exc:  # nothing safe to go back to: that will not change
                await self._decided(
                    probation, RolloutState.ENDED, f"{decision.reason}; not rolled back: {exc}", figures
                )
                return False
            log.warning(
                "rollout service: %s rolled back from v%s to v%s: %s", model.name, new, previous, decision.reason
            )
            self.metrics.rollbacks.labels(model.name).inc()
            await self._decided(probation, RolloutState.ROLLED_BACK, decision.reason, figures)
            return True
        state = RolloutState.PASSED if decision.action is ProbationAction.PASSED else RolloutState.INCONCLUSIVE
        await self._decided(probation, state, decision.reason, figures)
        return False

    # Shadow and canary -------------------------------------------------------------------------

    async def _follow_rollout(self, model: ModelAliases, rollout: RolloutRecord) -> RolloutRecord | None:
        """The rollout, or None when the registry shows it over: ended by other hands, or decided
        by a tick whose record was not written (recorded now from the version's tags)."""
        name, challenger = model.name, rollout.challenger_version
        if model.champion == challenger:
            tags = await asyncio.to_thread(self.registry.tags, name, challenger)
            reason = tags.get(DECISION_REASON_TAG) if tags.get(STATE_TAG) == "promoted" else None
            await asyncio.to_thread(self.registry.remove_challenger, name, challenger)
            await self._decided(
                rollout, RolloutState.PROMOTED, reason or f"v{challenger} became {self._alias} by other hands"
            )
            return None
        if model.champion != rollout.champion_version:
            await asyncio.to_thread(self.registry.remove_challenger, name, challenger)
            moved = "was removed" if model.champion is None else f"moved to v{model.champion} by other hands"
            await self._decided(
                rollout, RolloutState.ENDED, f"{self._alias} v{rollout.champion_version} {moved}: rollout ended"
            )
            return None
        if model.challenger != challenger:
            tags = await asyncio.to_thread(self.registry.tags, name, challenger)
            if tags.get(STATE_TAG) == "rejected" and model.challenger is None:
                await self._decided(rollout, RolloutState.REJECTED, tags.get(DECISION_REASON_TAG) or "rejected")
                return None
            moved = "was removed" if model.challenger is None else f"moved to v{model.challenger}"
            await self._decided(
                rollout, RolloutState.ENDED, f"the {CHALLENGER_ALIAS} alias {moved} by other hands: rollout ended"
            )
            return None
        return rollout

    async def _adopt(self, model: ModelAliases) -> None:
        name, challenger = model.name, model.challenger
        assert challenger is not None
        if model.champion == challenger:
            await asyncio.to_thread(self.registry.remove_challenger, name, challenger)
            log.info("rollout service: %s v%s is already %s: challenger alias removed", name, challenger, self._alias)
            return
        tags = await asyncio.to_thread(self.registry.tags, name, challenger)
        decided = await self.store.decided(name, challenger)
        if decided is not None and not _requested_after(tags.get(REQUESTED_AT_TAG), decided.started_at):
            # An alias left over from a decided rollout (a decision the registry has not caught up
            # with); the gate passing the version again stamps a newer request, which is adopted.
            await asyncio.to_thread(self.registry.remove_challenger, name, challenger)
            log.info(
                "rollout service: %s v%s was already %s: challenger alias removed", name, challenger, decided.state
            )
            return
        policy = policy_from_tag(tags.get(POLICY_TAG))
        job_id = tags.get(JOB_TAG) or None
        if policy is None or policy.mode == "immediate":
            await self._refuse(
                model, "shadow", policy, job_id, f"no readable shadow or canary policy in its {POLICY_TAG} tag"
            )
            return
        kind: Literal["shadow", "canary"] = policy.mode
        if model.champion is None:
            await self._refuse(model, kind, policy, job_id, f"model {name} has no {self._alias} to compare with")
            return
        steps = policy.judged_steps
        share = steps[0] if kind == "canary" and steps else 0.0
        rule = WindowRule.of(policy, self.settings.rollout)
        record = await self.store.start(
            name,
            kind,
            model.champion,
            challenger,
            share=share,
            policy=policy.model_dump(mode="json"),
            job_id=job_id,
            message=(
                f"v{challenger} rolled out as a {kind} against {self._alias} v{model.champion}"
                + (f" answering {share:.0%} of the traffic" if kind == "canary" else "")
                + f"; each window: {rule.window_requests} paired requests or {rule.window_s:.0f} s"
            ),
        )
        if record is None:  # another rollout of the model became active meanwhile
            return
        log.info("rollout service: %s v%s %s rollout %d started", name, challenger, kind, record.id)
        await self._annotate(
            record, f"{kind} rollout of {name} v{challenger} against {self._alias} v{model.champion} started"
        )
        if kind == "canary" and not steps:
            await self._promote(model, record, "the canary policy has no step below 100%: promoted at once", {})

    async def _refuse(
        self,
        model: ModelAliases,
        kind: Literal["shadow", "canary"],
        policy: RolloutPolicy | None,
        job_id: str | None,
        why: str,
    ) -> None:
        assert model.challenger is not None
        reason = f"challenger v{model.challenger} refused: {why}"
        await asyncio.to_thread(self.registry.reject, model.name, model.challenger, reason, {})
        record = await self.store.start(
            model.name,
            kind,
            model.champion or "",
            model.challenger,
            policy=None if policy is None else policy.model_dump(mode="json"),
            job_id=job_id,
            message=reason,
            state=RolloutState.REJECTED,
        )
        log.warning("rollout service: %s %s", model.name, reason)
        self.metrics.decisions.labels(model.name, RolloutState.REJECTED.value).inc()
        if record is not None:
            await self._annotate(record, f"rollout of {model.name} v{model.challenger} rejected: {reason}")

    async def _judge_rollout(self, model: ModelAliases, rollout: RolloutRecord, now: datetime) -> None:
        try:
            policy = RolloutPolicy.model_validate(rollout.policy)
        except ValidationError as exc:
            await self._reject(model, rollout, f"its recorded policy is unreadable ({exc.error_count()} errors)", {})
            return
        rule = WindowRule.of(policy, self.settings.rollout)
        elapsed = _seconds(now, rollout.step_started_at)
        figures = await self.feedback.paired_figures(
            model.name,
            rollout.champion_version,
            rollout.challenger_version,
            rollout.step_started_at,
            rule.regression_tolerance,
        )
        kind: Literal["shadow", "canary"] = "canary" if rollout.kind == "canary" else "shadow"
        decision = rollout_decision(kind, figures, elapsed, rule, rollout.step, policy.judged_steps)
        document = {**paired_document(figures, elapsed, rule), "step": rollout.step, "share": rollout.share}
        if decision.action is Action.CONTINUE:
            await self.store.save_figures(rollout.id, document)
        elif decision.action is Action.REJECT:
            await self._reject(model, rollout, decision.reason, document)
        elif decision.action is Action.PROMOTE:
            await self._promote(model, rollout, decision.reason, document)
        else:
            assert decision.next_share is not None
            advanced = await self.store.advance(
                rollout.id, rollout.step, decision.next_share, decision.reason, document
            )
            if advanced is not None:
                log.info("rollout service: %s v%s %s", model.name, rollout.challenger_version, decision.reason)
                self.metrics.decisions.labels(model.name, "next_step").inc()
                await self._annotate(
                    advanced, f"rollout of {model.name} v{rollout.challenger_version}: {decision.reason}"
                )

    async def _reject(self, model: ModelAliases, rollout: RolloutRecord, reason: str, figures: dict[str, Any]) -> None:
        await asyncio.to_thread(self.registry.reject, model.name, rollout.challenger_version, reason, figures)
        log.warning("rollout service: %s v%s rejected: %s", model.name, rollout.challenger_version, reason)
        await self._decided(rollout, RolloutState.REJECTED, reason, figures)

    async def _promote(self, model: ModelAliases, rollout: RolloutRecord, reason: str, figures: dict[str, Any]) -> None:
        await asyncio.to_thread(self.registry.promote, model.name, rollout.challenger_version, reason, figures)
        log.info("rollout service: %s v%s promoted: %s", model.name, rollout.challenger_version, reason)
        await self._decided(rollout, RolloutState.PROMOTED, reason, figures)

    # Records -----------------------------------------------------------------------------------

    async def _decided(
        self, record: RolloutRecord, state: RolloutState, reason: str, figures: dict[str, Any] | None = None
    ) -> None:
        """Record the outcome (once: a record that already ended is left as it is), count it and
        tell the training job."""
        ended = await self.store.finish(record.id, state, reason, figures)
        if ended is None:
            return
        self.metrics.decisions.labels(record.model_name, state.value).inc()
        what = "probation" if record.kind == "probation" else f"{record.kind} rollout"
        await self._annotate(
            ended,
            f"{what} of {record.model_name} v{record.challenger_version} {state.value.replace('_', ' ')}: {reason}",
        )

    async def _end_unregistered(self, record: RolloutRecord) -> None:
        """End a rollout or probation of a model the registry no longer lists, once it says so."""
        try:
            if not await asyncio.to_thread(self.registry.exists, record.model_name):
                await self._decided(record, RolloutState.ENDED, f"model {record.model_name} is no longer registered")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("rollout service: rollout %d not ended (%s); retried next tick", record.id, exc)

    async def _annotate(self, record: RolloutRecord, message: str) -> None:
        """An event in the history of the training job that produced the version, if any. Never
        fails the rollout: the job's history is a courtesy, the rollout's records are the truth."""
        if self.jobs is None or not record.job_id:
            return
        try:
            job_id = UUID(record.job_id)
        except ValueError:
            return
        try:
            await self.jobs.annotate(job_id, message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("rollout service: job %s not annotated (%s: %s)", job_id, type(exc).__name__, exc)


def _requested_after(requested_at: str | None, started_at: datetime) -> bool:
    """Whether the gate handed the version over (again) after a rollout of it started."""
    if not requested_at:
        return False
    try:
        requested = datetime.fromisoformat(requested_at)
    except ValueError:
        return False
    if requested.tzinfo is None:
        requested = requested.replace(tzinfo=UTC)
    return requested > started_at
