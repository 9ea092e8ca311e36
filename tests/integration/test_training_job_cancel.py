"""Cancelled, timed-out and hand-stopped training jobs with the real dispatcher and Ray: whatever
the timing, the job ends in its state and no Ray job of it is left running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from uuid import UUID, uuid4

import psycopg
from psycopg.rows import dict_row

from cluster.sandbox import Stack
from core.audit import Actor
from core.health import wait_until
from services.dispatcher.core import Dispatcher
from services.dispatcher.ray_jobs import RayJobs
from services.ray_submission import jobs_client
from services.training_jobs.broker import Publisher, Topology, encode
from services.training_jobs.models import JobSpec, JobState
from services.training_jobs.service import TrainingJobs
from tests.training_jobs_helpers import QUICK

T = TypeVar("T")
# Nothing these jobs train may become a champion: the other tests rely on the one they trained.
NO_PROMOTION = {**QUICK, "promotion.enabled": False}
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def _with_service(stack: Stack, fn: Callable[[TrainingJobs], Awaitable[T]]) -> T:
    async def run() -> T:
        jobs = TrainingJobs.from_settings(stack.settings, name=f"cancel-test {uuid4().hex[:6]}", store_retry_s=10)
        await jobs.start()
        try:
            return await fn(jobs)
        finally:
            await jobs.close()

    return asyncio.run(run())


def _row(stack: Stack, job_id: UUID) -> dict[str, Any]:
    assert stack.settings.database.url is not None
    with psycopg.connect(stack.settings.database.url.get_secret_value(), row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM training_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None
    return row


def _ray_status(stack: Stack, ray_job_id: str) -> str | None:
    """The Ray job's status, or None when Ray has never heard of it."""
    try:
        return str(jobs_client(stack.settings).get_job_info(ray_job_id).status.value)
    except RuntimeError as exc:
        assert "does not exist" in str(exc) or "404" in str(exc), exc
        return None


def _ray_jobs_of(stack: Stack, job_id: UUID) -> dict[str, str]:
    listed = jobs_client(stack.settings).list_jobs()
    return {
        str(j.submission_id): str(j.status.value)
        for j in listed
        if (j.metadata or {}).get("training_job_id") == str(job_id)
    }


def _key(name: str) -> Actor:
    return Actor(kind="api_key", key_id=uuid4().hex[:12], name=name)


def test_a_cancel_racing_the_submission_leaves_no_ray_job_running(stack):
    owner = _key("race")
    job, _ = _with_service(stack, lambda jobs: jobs.submit(JobSpec(overrides=NO_PROMOTION), None, actor=owner))
    # Cancel the moment the dispatcher has claimed it: it is submitting the Ray job, or about to.
    # The stack's one dispatcher may still be busy with another test's job first.
    assert wait_until(lambda: _row(stack, job.id)["state"] != "queued", 600, max_wait_s=0.05)
    assert _row(stack, job.id)["state"] == "submitted"
    cancelled = _with_service(stack, lambda jobs: jobs.cancel(job.id, owner, owner_key_id=owner.key_id))
    assert cancelled.state == JobState.CANCELLED

    # Stopped by its follower, or (never submitted) settled by the reaper after two heartbeat timeouts.
    settle_s = 2 * stack.settings.dispatcher.heartbeat_timeout_s
    assert wait_until(lambda: _row(stack, job.id)["ray_stop_confirmed_at"] is not None, settle_s + 120)
    row = _row(stack, job.id)
    assert _ray_status(stack, row["ray_job_id"]) in {"STOPPED", None}
    assert set(_ray_jobs_of(stack, job.id).values()) <= {"STOPPED"}
    assert row["state"] == "cancelled" and row["attempts"] == 1

    detail = _with_service(stack, lambda jobs: jobs.get(job.id, owner_key_id=owner.key_id))
    assert detail is not None and detail.created_by == owner
    assert [e.state for e in detail.events] == ["queued", "submitted", "cancelled"]  # nothing after the cancel
    assert detail.events[-1].actor == owner


def test_a_ray_job_stopped_by_hand_is_recorded_as_cancelled_not_failed(stack):
    job, _ = _with_service(
        stack, lambda jobs: jobs.submit(JobSpec(overrides=NO_PROMOTION), None, actor=Actor(kind="alert", name="T"))
    )
    assert wait_until(lambda: _row(stack, job.id)["state"] == "running", 300)
    ray_job_id = _row(stack, job.id)["ray_job_id"]
    jobs_client(stack.settings).stop_job(ray_job_id)  # what `ray job stop` does

    assert wait_until(lambda: _row(stack, job.id)["state"] != "running", 120)
    row = _row(stack, job.id)
    assert row["state"] == "cancelled" and row["attempts"] == 1  # not failed, and not retried
    assert row["ray_stop_confirmed_at"] is not None and _ray_status(stack, ray_job_id) == "STOPPED"
    detail = _with_service(stack, lambda jobs: jobs.get(job.id))
    assert detail is not None and "stopped outside the platform" in (detail.events[-1].message or "")


class _Delivery:
    """A request as the broker hands it to the dispatcher; records what the dispatcher does with it."""

    def __init__(self, job_id: UUID) -> None:
        self.body = encode(job_id)
        self.headers: dict[str, Any] = {}
        self.settled: list[str] = []

    async def ack(self) -> None:
        self.settled.append("ack")

    async def nack(self, requeue: bool = True) -> None:
        self.settled.append(f"nack requeue={requeue}")


def test_an_attempt_past_its_wall_time_ends_timed_out_with_its_ray_job_stopped(stack):
    """A dispatcher of its own with an eight-second limit, handed the request as the broker would;
    the job is never published, so the stack's dispatcher leaves it alone."""
    limits = stack.settings.dispatcher.model_copy(update={"max_wall_time_train_s": 8.0, "poll_interval_s": 0.5})
    settings = stack.settings.model_copy(update={"dispatcher": limits})
    creator = _key("wall-time")

    async def scenario() -> tuple[UUID, _Delivery, float | None]:
        jobs = TrainingJobs.from_settings(settings, name="wall-time-test", store_retry_s=10)
        await jobs.start()
        publisher = Publisher(settings.amqp.value() or "", Topology.from_settings(settings), "wall-time-test")
        dispatcher = Dispatcher(
            settings, jobs.store, publisher, RayJobs(settings.ray.dashboard_url, settings.ray.auth_headers())
        )
        try:
            job, _ = await jobs.store.create(
                JobSpec(overrides=NO_PROMOTION), 1, None, publish_grace_s=3600, actor=creator
            )
            delivery = _Delivery(job.id)
            await dispatcher._process(job.id, delivery)  # type: ignore[arg-type]
            counted = dispatcher.metrics.registry.get_sample_value(
                "training_job_attempts_total", {"kind": "train", "outcome": "timed_out"}
            )
            return job.id, delivery, counted
        finally:
            await publisher.close()
            await jobs.close()

    job_id, delivery, counted = asyncio.run(scenario())
    row = _row(stack, job_id)
    assert row["state"] == "timed_out" and "maximum wall time of 8s" in row["last_error"]
    assert row["ray_stop_confirmed_at"] is not None
    assert _ray_status(stack, row["ray_job_id"]) == "STOPPED"
    assert delivery.settled == ["ack"] and counted == 1
    # The Ray job knew who started it (the training job tags its model version with it).
    runtime_env = jobs_client(stack.settings).get_job_info(row["ray_job_id"]).runtime_env or {}
    assert Actor.from_json(runtime_env["env_vars"]["AUDIT_ACTOR"]) == creator
    detail = _with_service(stack, lambda jobs: jobs.get(job_id))
    assert detail is not None and detail.events[-1].state == "timed_out"
    assert detail.events[-1].actor == Actor.system()


def test_the_ray_job_of_a_cancelled_job_whose_follower_died_is_stopped_by_the_reaper(stack):
    """A dispatcher claimed the job, submitted its Ray job and died (the job was never published,
    so no other dispatcher follows it); then the job is cancelled. The dispatchers' reaper stops it."""
    owner = _key("orphan")

    async def scenario(jobs: TrainingJobs) -> str:
        job, _ = await jobs.store.create(JobSpec(overrides=NO_PROMOTION), 1, None, publish_grace_s=3600, actor=owner)
        claimed = await jobs.store.claim(job.id, "a dispatcher about to die")
        assert claimed is not None and claimed.ray_job_id is not None
        ray = RayJobs(stack.settings.ray.dashboard_url, stack.settings.ray.auth_headers())
        await ray.ensure_submitted(claimed.ray_job_id, claimed.spec(), job.id, None, owner)
        await jobs.cancel(job.id, owner, owner_key_id=owner.key_id)
        return claimed.ray_job_id

    ray_job_id = _with_service(stack, scenario)
    job_id = UUID(ray_job_id.removeprefix("training-").rsplit("-", 1)[0])
    assert wait_until(lambda: _row(stack, job_id)["ray_stop_confirmed_at"] is not None, 180)
    assert _ray_status(stack, ray_job_id) == "STOPPED"
    assert _row(stack, job_id)["state"] == "cancelled"
