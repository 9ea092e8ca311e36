"""The rollout service against this machine's PostgreSQL and a real MLflow registry (SQLite, in
this process): it adopts a challenger alias, judges shadow windows and canary steps on the paired
rows the replicas record, promotes or rejects through the registry, puts a champion on probation
and rolls it back, resumes after a restart from its records, and acts only while it leads.

The rows are written as the replicas write them (`record_predictions`, `record_shadow_predictions`,
feedback through `add_feedback`); each tick is called directly instead of waiting for the loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from uuid import UUID, uuid4

import psycopg
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prometheus_client import CollectorRegistry

from cluster.sandbox import temporary_database
from core.audit import Actor
from core.settings import Settings
from jobs.config import RolloutPolicy
from jobs.rollout import (
    CHALLENGER_ALIAS,
    FIGURES_TAG,
    JOB_TAG,
    POLICY_TAG,
    PREVIOUS_CHAMPION_TAG,
    REQUESTED_AT_TAG,
    RESTORED_FROM_TAG,
    ROLLED_BACK_TAG,
    STATE_TAG,
    move_champion,
    policy_tag,
)
from services.feedback.store import FeedbackStore, PredictionRow, ShadowRow
from services.rollout.controller import SERVICE_IDENTITY, RolloutController
from services.rollout.models import RolloutRecord, RolloutState
from services.rollout.store import RolloutStore
from services.training_jobs.models import JobSpec, JobState
from services.training_jobs.store import JobStore

MODEL = "income"
ALIAS = "champion"
T = TypeVar("T")


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("rollout_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _settings(dsn: str, tracking_uri: str) -> Settings:
    return Settings(
        _env_file=None,
        database={"url": dsn},
        mlflow={"tracking_uri": tracking_uri},
        rollout={
            "window_requests": 20,
            "window_s": 3600,
            "min_rows": 10,
            "min_agreement": 0.9,
            "min_labels": 5,
            "max_accuracy_drop": 0.02,
            "regression_tolerance": 0.1,
        },
        probation={"window_s": 3600, "min_labels": 5, "min_rows": 10, "max_drop": 0.05},
    )


@dataclass
class World:
    """The service's surroundings: the registry, the stores, and a controller (a dispatcher's)."""

    settings: Settings
    dsn: str
    client: MlflowClient
    feedback: FeedbackStore
    jobs: JobStore
    source: Path
    controllers: list[RolloutController]

    async def controller(self) -> RolloutController:
        controller = RolloutController(
            self.settings, RolloutStore(self.dsn, retry_for_s=5), self.feedback, self.jobs, CollectorRegistry()
        )
        await controller.prepare()
        self.controllers.append(controller)
        return controller

    def version(self) -> str:
        return str(self.client.create_model_version(MODEL, source=str(self.source)).version)

    def champion(self) -> str | None:
        aliases = self.client.get_registered_model(MODEL).aliases or {}
        value = aliases.get(ALIAS)
        return None if value is None else str(value)

    def challenger(self) -> str | None:
        value = (self.client.get_registered_model(MODEL).aliases or {}).get(CHALLENGER_ALIAS)
        return None if value is None else str(value)

    def tags(self, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(MODEL, version).tags)

    def hand_over(self, version: str, policy: RolloutPolicy, job_id: str = "") -> None:
        """What the gate does for a shadow or canary policy."""
        self.client.set_model_version_tag(MODEL, version, POLICY_TAG, policy_tag(policy))
        self.client.set_model_version_tag(MODEL, version, JOB_TAG, job_id)
        self.client.set_model_version_tag(MODEL, version, REQUESTED_AT_TAG, datetime.now(UTC).isoformat())
        self.client.set_registered_model_alias(MODEL, CHALLENGER_ALIAS, version)

    async def serve(
        self,
        prefix: str,
        n: int,
        served: str,
        mirrored: str,
        served_label: str = "yes",
        mirrored_label: str = "yes",
        truth: str | None = None,
        rollout_id: int | None = None,
    ) -> None:
        """`n` single-row requests answered by `served`, mirrored to `mirrored`, labelled `truth`."""
        await self.feedback.record_predictions(
            [
                PredictionRow(f"{prefix}-{i}", 0, MODEL, served, served_label, 0.9, {"x": i}, _output(served_label))
                for i in range(n)
            ]
        )
        await self.feedback.record_shadow_predictions(
            [
                ShadowRow(f"{prefix}-{i}", 0, MODEL, mirrored, mirrored_label, 0.8, _output(mirrored_label), rollout_id)
                for i in range(n)
            ]
        )
        if truth is not None:
            for i in range(n):
                await self.feedback.add_feedback(f"{prefix}-{i}", 0, truth, 3600)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(statement, params)


def _output(label: str) -> dict[str, Any]:
    other = "no" if label == "yes" else "yes"
    return {"probabilities": {label: 0.9, other: 0.1}}


def _run(dsn: str, tracking_uri: str, tmp_path: Path, scenario: Callable[[World], Awaitable[T]]) -> T:
    async def main() -> T:
        settings = _settings(dsn, tracking_uri)
        client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
        client.create_registered_model(MODEL)
        source = tmp_path / "artifacts"
        source.mkdir(exist_ok=True)
        feedback, jobs = FeedbackStore(dsn, retry_for_s=5), JobStore(dsn, retry_for_s=5)
        await jobs.open()
        await jobs.migrate()
        world = World(settings, dsn, client, feedback, jobs, source, [])
        try:
            return await scenario(world)
        finally:
            for controller in world.controllers:
                await controller.close()
            await feedback.close()
            await jobs.close()

    return asyncio.run(main())


async def _only(controller: RolloutController, kind: str = "rollout") -> RolloutRecord:
    overview = await controller.store.overview(MODEL)
    record = overview.probation if kind == "probation" else overview.rollout
    assert record is not None, overview
    return record


def _sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def _job(world: World) -> str:
    job, _ = await world.jobs.create(JobSpec(), 1, None, 0, actor=Actor.system())
    return str(job.id)


async def _job_messages(world: World, job_id: str) -> list[str]:
    detail = await world.jobs.detail(UUID(job_id))
    assert detail is not None
    return [event.message or "" for event in detail.events]


# Scenarios -------------------------------------------------------------------------------------


def test_a_shadow_that_disagrees_is_rejected_early_and_its_alias_never_comes_back(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        job_id = await _job(world)
        world.hand_over(v2, RolloutPolicy(mode="shadow"), job_id)
        service = await world.controller()
        registry = service.metrics.registry
        assert await service.tick()

        record = await _only(service)
        assert (record.kind, record.state, record.champion_version, record.challenger_version) == (
            "shadow",
            RolloutState.ACTIVE,
            v1,
            v2,
        )
        assert record.share == 0 and record.step == 0 and record.job_id == job_id
        assert [r.id for r in await service.store.serving_rollouts()] == [record.id]
        assert _sample(registry, "model_rollout_active", model=MODEL, mode="shadow", challenger_version=v2) == 1

        # Fewer rows than the window needs, but enough to see the harm: rejected at once.
        await world.serve("a", 12, v1, v2, "yes", "no", rollout_id=record.id)
        assert await service.tick()
        record = await _only(service)
        assert record.state is RolloutState.REJECTED, record
        assert "agreement with the champion 0.000" in (record.reason or "")
        assert record.figures["rows"] == 12 and record.figures["agreement"] == 0.0
        assert world.challenger() is None and world.champion() == v1
        tags = world.tags(v2)
        assert tags[STATE_TAG] == "rejected" and json.loads(tags[FIGURES_TAG])["rows"] == 12
        assert await service.store.serving_rollouts() == []
        assert _sample(registry, "model_rollout_decisions_total", model=MODEL, outcome="rejected") == 1
        assert _sample(registry, "model_rollout_active", model=MODEL, mode="shadow", challenger_version=v2) is None
        messages = await _job_messages(world, job_id)
        assert any("shadow rollout of income" in m and "started" in m for m in messages), messages
        detail = await world.jobs.detail(UUID(job_id))
        assert detail is not None and detail.state is JobState.QUEUED  # annotated, not moved
        assert not await world.jobs.annotate(uuid4(), "no such job")
        assert any("rejected" in m and "agreement" in m for m in messages), messages
        events = [e.kind for e in (await service.store.overview(MODEL)).events]
        assert events == ["rejected", "started"]

        # An alias left on (or set again on) a version already decided is removed, and nothing starts.
        world.client.set_registered_model_alias(MODEL, CHALLENGER_ALIAS, v2)
        assert await service.tick()
        assert world.challenger() is None
        assert (await _only(service)).id == record.id
        # The gate handing the same version over again is a new request: a new rollout starts.
        world.hand_over(v2, RolloutPolicy(mode="canary"))
        assert await service.tick()
        again = [r for r in await service.store.serving_rollouts() if r.model_name == MODEL]
        assert len(again) == 1 and again[0].id != record.id and again[0].kind == "canary", again

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_shadow_that_agrees_is_promoted_after_its_window_and_its_champion_goes_on_probation(
    dsn, tracking_uri, tmp_path, monkeypatch
):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        world.hand_over(v2, RolloutPolicy(mode="shadow"))
        service = await world.controller()
        registry = service.metrics.registry
        assert await service.tick()
        record = await _only(service)
        assert record.job_id is None  # the CLI's gate has no job

        # Half the window: the figures are stored, nothing is decided.
        await world.serve("a", 10, v1, v2, truth="yes")
        assert await service.tick()
        record = await _only(service)
        assert record.state is RolloutState.ACTIVE and record.figures["requests"] == 10
        assert record.figures["labelled"] == 10 and record.figures["challenger_accuracy"] == 1.0
        assert _sample(registry, "model_shadow_agreement", model=MODEL, challenger_version=v2) == 1.0
        assert _sample(registry, "model_shadow_rows", model=MODEL, challenger_version=v2) == 10
        assert _sample(registry, "model_rollout_accuracy", model=MODEL, model_version=v1, role="champion") == 1.0

        # The window is full, but the registry fails: nothing changes, the next tick does it.
        await world.serve("b", 10, v1, v2)
        failing = service.registry.promote

        def unreachable(*args: Any) -> None:
            raise MlflowException("registry unavailable")

        monkeypatch.setattr(service.registry, "promote", unreachable)
        assert await service.tick()
        assert (await _only(service)).state is RolloutState.ACTIVE and world.champion() == v1
        monkeypatch.setattr(service.registry, "promote", failing)
        assert await service.tick()

        record = await _only(service)
        assert record.state is RolloutState.PROMOTED, record
        assert "after 20 paired requests" in (record.reason or "") and (record.reason or "").endswith("promoted")
        assert world.champion() == v2 and world.challenger() is None
        tags = world.tags(v2)
        assert tags[STATE_TAG] == "promoted" and tags[PREVIOUS_CHAMPION_TAG] == v1

        # The new champion is on probation against the one it replaced.
        assert await service.tick()
        probation = await _only(service, "probation")
        assert (probation.state, probation.champion_version, probation.challenger_version) == (
            RolloutState.ACTIVE,
            v1,
            v2,
        )
        assert _sample(registry, "model_probation_active", model=MODEL, model_version=v2) == 1

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_canary_moves_through_its_steps_and_a_worse_step_gives_the_traffic_back(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        job_id = await _job(world)
        world.hand_over(v2, RolloutPolicy(mode="canary", canary_steps=[0.1, 0.5, 1.0]), job_id)
        service = await world.controller()
        registry = service.metrics.registry
        assert await service.tick()
        first = await _only(service)
        assert (first.kind, first.step, first.share) == ("canary", 0, 0.1)
        assert _sample(registry, "model_rollout_canary_share", model=MODEL) == 0.1

        # Step 1 passes: the champion answered most, the challenger its share, both mirrored.
        await world.serve("a", 18, v1, v2)
        await world.serve("b", 2, v2, v1)
        assert await service.tick()
        second = await _only(service)
        assert (second.id, second.state, second.step, second.share) == (first.id, RolloutState.ACTIVE, 1, 0.5)
        assert second.step_started_at > first.step_started_at and second.figures == {}
        assert _sample(registry, "model_rollout_step", model=MODEL) == 1
        step_event = (await service.store.overview(MODEL)).events[0]
        assert step_event.kind == "step" and step_event.figures["challenger_served_rows"] == 2
        assert "next step: 50%" in step_event.message

        # Step 2's own rows (the earlier ones belong to step 1) show a worse challenger.
        await world.serve("c", 6, v1, v2, "yes", "no")
        await world.serve("d", 6, v2, v1, "no", "yes")
        assert await service.tick()
        ended = await _only(service)
        assert ended.id == first.id and ended.state is RolloutState.REJECTED and ended.step == 1, ended
        assert ended.share == 0 and ended.figures["rows"] == 12 and ended.figures["challenger_served_rows"] == 6
        assert (ended.reason or "").startswith("canary step 2 (50% of traffic): agreement")
        assert await service.store.serving_rollouts() == []  # the replicas give the champion all traffic
        assert world.champion() == v1 and world.challenger() is None
        messages = await _job_messages(world, job_id)
        assert any("next step: 50%" in m for m in messages) and any("rejected" in m for m in messages), messages

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_champion_worse_on_probation_is_rolled_back_and_both_versions_say_so(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        service = await world.controller()
        registry = service.metrics.registry
        assert await service.tick()  # first sight: v1 recorded, no probation
        assert (await service.store.overview(MODEL)).probation is None

        await world.feedback.record_predictions(
            [PredictionRow(f"p-{i}", 0, MODEL, v1, "yes", 0.9, {}, _output("yes")) for i in range(12)]
        )
        for i in range(12):
            await world.feedback.add_feedback(f"p-{i}", 0, "yes", 3600)
        move_champion(world.client, MODEL, ALIAS, v2, v1)  # an immediate promotion
        assert await service.tick()
        probation = await _only(service, "probation")
        assert (probation.champion_version, probation.challenger_version) == (v1, v2)
        # A minute into the probation: the previous champion's rows are in the minute before it.
        world.sql("UPDATE rollouts SET started_at = started_at - interval '60 s' WHERE id = %s", (probation.id,))
        world.sql("UPDATE predictions SET created_at = created_at - interval '90 s' WHERE model_version = %s", (v1,))
        await world.feedback.record_predictions(
            [PredictionRow(f"n-{i}", 0, MODEL, v2, "no", 0.9, {}, _output("no")) for i in range(12)]
        )
        for i in range(12):
            await world.feedback.add_feedback(f"n-{i}", 0, "yes", 3600)
        assert await service.tick()

        record = await _only(service, "probation")
        assert record.state is RolloutState.ROLLED_BACK, record
        assert "live accuracy of v2 0.000 on 12 labelled rows against v1's 1.000" in (record.reason or "")
        assert record.figures["basis"] == "labels" and record.figures["drop"] == 1.0
        assert world.champion() == v1
        rolled = json.loads(world.tags(v2)[ROLLED_BACK_TAG])
        assert rolled["to"] == v1 and rolled["by"] == SERVICE_IDENTITY and rolled["reason"] == record.reason
        assert world.tags(v1)[RESTORED_FROM_TAG] == v2
        assert _sample(registry, "model_rollbacks_total", model=MODEL) == 1
        assert record.ended_at is not None
        assert _sample(
            registry, "model_last_rollback_timestamp_seconds", model=MODEL, model_version=v2, restored_version=v1
        ) == pytest.approx(record.ended_at.timestamp())

        # The restored champion is not on probation: it is what a rollback went back to.
        assert await service.tick()
        assert (await _only(service, "probation")).id == record.id
        assert (await service.store.champions())[MODEL].version == v1

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_rollout_survives_a_restart_of_its_owner_and_resumes_at_the_same_step(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        world.hand_over(v2, RolloutPolicy(mode="canary", canary_steps=[0.2, 0.6, 1.0]))
        first = await world.controller()
        assert await first.tick()
        await world.serve("a", 20, v1, v2)
        assert await first.tick()
        before = await _only(first)
        assert before.step == 1
        await first.close()  # the dispatcher stops (or dies: its session ends either way)
        world.controllers.remove(first)

        second = await world.controller()
        assert await second.tick()
        resumed = await _only(second)
        assert (resumed.id, resumed.step, resumed.share, resumed.step_started_at) == (
            before.id,
            1,
            0.6,
            before.step_started_at,
        )
        await world.serve("b", 20, v1, v2)
        assert await second.tick()
        done = await _only(second)
        assert done.id == before.id and done.state is RolloutState.PROMOTED and world.champion() == v2

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_second_service_stands_by_while_the_first_leads_and_takes_over_when_it_goes(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        leader, standby = await world.controller(), await world.controller()
        assert await leader.tick()
        world.hand_over(v2, RolloutPolicy(mode="shadow"))
        for _ in range(2):
            assert not await standby.tick()
        assert await leader.store.serving_rollouts() == []  # the stand-by adopted nothing
        standby_registry = standby.metrics.registry
        assert _sample(standby_registry, "rollout_service_leader") == 0

        assert await leader.tick()
        record = await _only(leader)
        await leader.close()
        world.controllers.remove(leader)
        assert await standby.tick()  # its next try takes the lock the first session released
        assert _sample(standby_registry, "rollout_service_leader") == 1
        assert (await _only(standby)).id == record.id

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_challengers_the_service_cannot_roll_out_are_refused_and_hand_moves_end_rollouts(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2, v3 = world.version(), world.version(), world.version()
        service = await world.controller()
        # No champion to compare with.
        world.hand_over(v2, RolloutPolicy(mode="shadow"))
        assert await service.tick()
        refused = await _only(service)
        assert refused.state is RolloutState.REJECTED and "has no champion" in (refused.reason or "")
        assert world.challenger() is None and world.tags(v2)[STATE_TAG] == "rejected"

        # A policy tag that cannot be read.
        move_champion(world.client, MODEL, ALIAS, v1, None)
        world.client.set_model_version_tag(MODEL, v3, POLICY_TAG, "{not json")
        world.client.set_registered_model_alias(MODEL, CHALLENGER_ALIAS, v3)
        assert await service.tick()
        unreadable = await _only(service)
        assert unreadable.state is RolloutState.REJECTED and "no readable shadow or canary policy" in (
            unreadable.reason or ""
        )

        # The challenger alias removed by hand ends the rollout; a champion moved by hand too.
        v4, v5 = world.version(), world.version()
        world.hand_over(v4, RolloutPolicy(mode="shadow"))
        assert await service.tick()
        assert (await _only(service)).state is RolloutState.ACTIVE
        world.client.delete_registered_model_alias(MODEL, CHALLENGER_ALIAS)
        assert await service.tick()
        removed = await _only(service)
        assert removed.state is RolloutState.ENDED and "alias was removed by other hands" in (removed.reason or "")

        world.hand_over(v5, RolloutPolicy(mode="shadow"))
        assert await service.tick()
        active = await _only(service)
        assert active.challenger_version == v5 and active.state is RolloutState.ACTIVE
        move_champion(world.client, MODEL, ALIAS, v3, v1)
        assert await service.tick()
        moved = await _only(service)
        assert moved.id == active.id and moved.state is RolloutState.ENDED
        assert "moved to v3 by other hands" in (moved.reason or "") and world.challenger() is None
        # ... and the hand-moved champion is on probation like any other.
        probation = await _only(service, "probation")
        assert probation.challenger_version == v3 and probation.state is RolloutState.ACTIVE

        # A model deleted from the registry takes its probation with it.
        world.client.delete_registered_model(MODEL)
        assert await service.tick()
        gone = await _only(service, "probation")
        assert gone.id == probation.id and gone.state is RolloutState.ENDED
        assert gone.reason == f"model {MODEL} is no longer registered"

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_a_decision_the_database_missed_is_recorded_from_the_registry_on_the_next_tick(
    dsn, tracking_uri, tmp_path, monkeypatch
):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        job_id = await _job(world)
        world.hand_over(v2, RolloutPolicy(mode="shadow"), job_id)
        service = await world.controller()
        assert await service.tick()
        await world.serve("a", 20, v1, v2)
        finish = service.store.finish

        async def unreachable(*args: Any, **kwargs: Any) -> None:
            raise psycopg.OperationalError("the database went away")

        # The registry promoted, then the database failed before the record was written.
        monkeypatch.setattr(service.store, "finish", unreachable)
        assert await service.tick()
        assert world.champion() == v2 and (await _only(service)).state is RolloutState.ACTIVE
        monkeypatch.setattr(service.store, "finish", finish)
        assert await service.tick()
        record = await _only(service)
        assert record.state is RolloutState.PROMOTED and "after 20 paired requests" in (record.reason or "")
        assert (await _only(service, "probation")).challenger_version == v2
        messages = await _job_messages(world, job_id)
        assert any("shadow rollout of income v2 promoted" in m for m in messages), messages

    _run(dsn, tracking_uri, tmp_path, scenario)


def test_the_loop_adopts_on_its_own_and_stops_cleanly(dsn, tracking_uri, tmp_path):
    async def scenario(world: World) -> None:
        v1, v2 = world.version(), world.version()
        move_champion(world.client, MODEL, ALIAS, v1, None)
        world.hand_over(v2, RolloutPolicy(mode="shadow"))
        world.settings.rollout.refresh_s = 0.2
        service = await world.controller()
        loop = asyncio.create_task(service.run())
        try:
            for _ in range(100):
                if await service.store.serving_rollouts():
                    break
                await asyncio.sleep(0.1)
            assert [r.challenger_version for r in await service.store.serving_rollouts()] == [v2]
        finally:
            loop.cancel()
            await asyncio.gather(loop, return_exceptions=True)
        await service.close()
        world.controllers.remove(service)
        assert not service.leadership.leading

    _run(dsn, tracking_uri, tmp_path, scenario)


# The figures in SQL -----------------------------------------------------------------------------


def test_paired_figures_count_both_directions_labels_and_regression_tolerance(dsn):
    async def scenario() -> None:
        store = FeedbackStore(dsn, retry_for_s=5)
        await store.open()
        await store.migrate()
        try:
            since = await RolloutStore(dsn).run_once(lambda s: s.clock())
            rows = [
                # served by the champion "1", mirrored by "2"; request r0 has two rows
                PredictionRow("r0", 0, MODEL, "1", "yes", 0.9, {}, _output("yes")),
                PredictionRow("r0", 1, MODEL, "1", "no", 0.7, {}, _output("no")),
                # served by the challenger (canary), mirrored by the champion
                PredictionRow("r1", 0, MODEL, "2", "yes", 0.8, {}, _output("yes")),
                # no mirror: not paired
                PredictionRow("r2", 0, MODEL, "1", "yes", 0.6, {}, _output("yes")),
                # another version's mirror: not this pair
                PredictionRow("r3", 0, MODEL, "1", "yes", 0.6, {}, _output("yes")),
            ]
            await store.record_predictions(rows)
            await store.record_shadow_predictions(
                [
                    ShadowRow("r0", 0, MODEL, "2", "yes", 0.9, _output("yes"), 1),
                    ShadowRow("r0", 1, MODEL, "2", "yes", 0.9, _output("yes"), 1),
                    ShadowRow("r1", 0, MODEL, "1", "no", 0.9, _output("no"), 1),
                    ShadowRow("r1", 0, MODEL, "1", "yes", 0.9, _output("yes"), 1),  # a repeat keeps the first
                    ShadowRow("r3", 0, MODEL, "9", "yes", 0.9, _output("yes"), 1),
                ]
            )
            await store.add_feedback("r0", 1, "yes", 3600)  # champion wrong, challenger right
            await store.add_feedback("r1", 0, "yes", 3600)  # challenger (served) right, champion wrong
            figures = await store.paired_figures(MODEL, "1", "2", since, 0.1)
            assert (figures.rows, figures.requests, figures.agreeing) == (3, 2, 1)
            assert (figures.labelled, figures.champion_correct, figures.challenger_correct) == (2, 0, 2)
            assert figures.challenger_served_rows == 1 and not figures.regression
            later = await store.paired_figures(
                MODEL, "1", "2", await RolloutStore(dsn).run_once(lambda s: s.clock()), 0.1
            )
            assert later.rows == 0 and later.agreement is None

            # Regression: values agree within the tolerance, relative to the champion's value.
            await store.record_predictions(
                [
                    PredictionRow(f"g{i}", 0, "price", "1", None, None, {}, {"value": value})
                    for i, value in enumerate((100.0, 0.0, -50.0))
                ]
            )
            await store.record_shadow_predictions(
                [
                    ShadowRow("g0", 0, "price", "2", None, None, {"value": 109.0}, None),  # 9%: agrees
                    ShadowRow("g1", 0, "price", "2", None, None, {"value": 0.001}, None),  # off a zero: disagrees
                    ShadowRow("g2", 0, "price", "2", None, None, {"value": -56.0}, None),  # 12%: disagrees
                ]
            )
            regression = await store.paired_figures("price", "1", "2", since, 0.1)
            assert (regression.rows, regression.agreeing, regression.labelled) == (3, 1, 0)
            assert regression.regression

            window = await store.version_window(
                MODEL, "1", since, await RolloutStore(dsn).run_once(lambda s: s.clock())
            )
            assert (window.rows, window.labelled, window.correct, window.probability_rows) == (4, 1, 0, 4)
            assert window.estimated_accuracy == pytest.approx((0.9 + 0.7 + 0.6 + 0.6) / 4)

            # Retention takes the mirrored rows with the served ones.
            assert await store.delete_predictions_older_than(0, 100, 10) == 8 + 7
            assert (await store.paired_figures(MODEL, "1", "2", since, 0.1)).rows == 0
        finally:
            await store.close()

    asyncio.run(scenario())
