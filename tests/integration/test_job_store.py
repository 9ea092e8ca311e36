"""The job store on this machine's PostgreSQL: claims, retries and the outbox under concurrency;
per-key quotas, cancellation, wall-time limits and who did what."""

import asyncio
from collections.abc import Iterator
from uuid import uuid4

import psycopg
import pytest

from cluster.sandbox import temporary_database
from core.audit import Actor
from services.training_jobs.models import JobRecord, JobSpec, JobState
from services.training_jobs.quota import ACTIVE_RETRY_AFTER_S, JobQuota, QuotaExceededError
from services.training_jobs.store import (
    MIGRATIONS,
    IdempotencyConflictError,
    JobFinishedError,
    JobNotFoundError,
    JobStore,
)

SYSTEM = Actor.system()


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("jobstore_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


async def _store(dsn: str) -> JobStore:
    store = JobStore(dsn, retry_for_s=10)
    await store.open()
    await store.migrate()
    return store


def test_concurrent_claims_start_one_attempt(dsn):
    async def scenario() -> list[JobRecord | None]:
        stores = [await _store(dsn) for _ in range(4)]
        try:
            job, _ = await stores[0].create(
                JobSpec(), max_attempts=3, traceparent=None, publish_grace_s=0, actor=SYSTEM
            )
            # Four dispatchers received a copy of the same request at once.
            return await asyncio.gather(*(s.claim(job.id, f"d{i}") for i, s in enumerate(stores)))
        finally:
            for s in stores:
                await s.close()

    claims = asyncio.run(scenario())
    winners = [c for c in claims if c is not None]
    assert len(winners) == 1
    assert winners[0].attempts == 1 and winners[0].state == JobState.SUBMITTED
    assert winners[0].ray_job_id == f"training-{winners[0].id}-1"


def test_idempotency_key_returns_the_same_job_or_conflicts(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            spec = JobSpec(overrides={"train.epochs": 2}, idempotency_key="nightly-1")
            results = await asyncio.gather(*(store.create(spec, 3, None, 0, actor=SYSTEM) for _ in range(5)))
            assert len({job.id for job, _ in results}) == 1
            assert sum(created for _, created in results) == 1
            with pytest.raises(IdempotencyConflictError):
                await store.create(spec.model_copy(update={"overrides": {"train.epochs": 3}}), 3, None, 0, actor=SYSTEM)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_failed_attempts_are_retried_then_end_and_stale_updates_are_ignored(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            job, _ = await store.create(JobSpec(), max_attempts=2, traceparent="tp", publish_grace_s=0, actor=SYSTEM)
            first = await store.claim(job.id, "d")
            assert first is not None
            assert await store.schedule_retry(job.id, 1, "boom", delay_s=0)
            assert not await store.schedule_retry(job.id, 1, "boom again", delay_s=0)  # duplicate follower
            published: list[str] = []

            async def publish(record: JobRecord, traceparent: str | None) -> None:
                published.append(f"{record.id}:{traceparent}")

            assert await store.publish_due(publish) == 1 and published == [f"{job.id}:tp"]
            assert await store.publish_due(publish) == 0  # published once
            second = await store.claim(job.id, "d")
            assert second is not None and second.attempts == 2
            assert not await store.succeed(job.id, 1, {"run_id": "stale"})  # an old attempt cannot finish it
            assert await store.end(job.id, 2, JobState.DEAD_LETTERED, "gave up")
            detail = await store.detail(job.id)
            assert detail is not None and detail.state == JobState.DEAD_LETTERED
            assert [e.state for e in detail.events] == ["queued", "submitted", "queued", "submitted", "dead_lettered"]
            operator = Actor(kind="operator", user="ops", host="head-1")
            requeued = await store.requeue(job.id, extra_attempts=2, actor=operator)
            assert requeued is not None and requeued.state == JobState.QUEUED and requeued.max_attempts == 4
            assert await store.requeue(job.id, extra_attempts=2, actor=operator) is None  # only ended jobs
            detail = await store.detail(job.id)
            assert detail is not None and detail.events[-1].actor == operator
            assert detail.events[-1].message == "re-queued by operator:ops@head-1"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_outbox_hands_each_due_job_to_one_relay(dsn):
    async def scenario() -> list[list[str]]:
        stores = [await _store(dsn) for _ in range(3)]
        try:
            for _ in range(20):
                await stores[0].create(JobSpec(), 3, None, publish_grace_s=0, actor=SYSTEM)
            sent: list[list[str]] = [[] for _ in stores]

            def collector(bucket: list[str]):
                async def publish(record: JobRecord, traceparent: str | None) -> None:
                    await asyncio.sleep(0.01)  # hold the row locks a while, as a real publish does
                    bucket.append(str(record.id))

                return publish

            await asyncio.gather(*(s.publish_due(collector(b), limit=10) for s, b in zip(stores, sent, strict=True)))
            await asyncio.gather(*(s.publish_due(collector(b), limit=10) for s, b in zip(stores, sent, strict=True)))
            return sent
        finally:
            for s in stores:
                await s.close()

    sent = asyncio.run(scenario())
    everything = [job for bucket in sent for job in bucket]
    assert len(everything) == len(set(everything)) == 20


def _key(name: str) -> Actor:
    return Actor(kind="api_key", key_id=uuid4().hex[:12], name=name)


def _set(dsn: str, job_id: object, assignment: str) -> None:
    """Move a job's clock back (created or submitted earlier) as time passing would."""
    with psycopg.connect(dsn) as conn:
        conn.execute(f"UPDATE training_jobs SET {assignment} WHERE id = %s", (job_id,))


def test_concurrent_requests_of_one_key_never_exceed_its_active_limit(dsn):
    async def scenario() -> list[object]:
        stores = [await _store(dsn) for _ in range(3)]
        key = _key("ci")
        quota = JobQuota(max_active=2, max_per_hour=100)
        try:
            return await asyncio.gather(
                *(
                    stores[i % 3].create(JobSpec(), 3, None, 0, actor=key, quota=quota)
                    for i in range(8)  # more requests than pool connections: they queue as well as race
                ),
                return_exceptions=True,
            )
        finally:
            for s in stores:
                await s.close()

    results = asyncio.run(scenario())
    accepted = [r for r in results if isinstance(r, tuple)]
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert len(accepted) == 2 and len(refused) == 6, results
    assert {(e.limit, e.limit_value, e.retry_after_s) for e in refused} == {("active", 2, ACTIVE_RETRY_AFTER_S)}
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM training_jobs").fetchone() == (2,)  # nothing stored for a 429


def test_a_job_that_ends_frees_an_active_slot(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        key = _key("ci")
        quota = JobQuota(max_active=1, max_per_hour=100)
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            with pytest.raises(QuotaExceededError):
                await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            await store.cancel(job.id, key, owner_key_id=key.key_id)
            _, created = await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            assert created
        finally:
            await store.close()

    asyncio.run(scenario())


def test_hourly_limit_says_when_the_oldest_job_leaves_the_window(dsn):
    async def scenario() -> QuotaExceededError:
        store = await _store(dsn)
        key = _key("nightly")
        quota = JobQuota(max_active=10, max_per_hour=2)
        try:
            first, _ = await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            # The first job was started 50 minutes ago: it leaves the hour in 10 minutes.
            _set(dsn, first.id, "created_at = now() - interval '50 minutes'")
            with pytest.raises(QuotaExceededError) as refused:
                await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            # Another key is not held back by this one's jobs.
            _, created = await store.create(JobSpec(), 3, None, 0, actor=_key("other"), quota=quota)
            assert created
            # Once it has left the window, the key may start one more.
            _set(dsn, first.id, "created_at = now() - interval '61 minutes'")
            _, created = await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            assert created
            return refused.value
        finally:
            await store.close()

    refused = asyncio.run(scenario())
    assert refused.limit == "hourly" and refused.limit_value == 2
    assert 590 <= refused.retry_after_s <= 600, refused.retry_after_s
    assert "TRAINING_MAX_PER_HOUR_PER_KEY" in refused.message


def test_an_idempotent_replay_is_answered_past_the_quota(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        key = _key("ci")
        quota = JobQuota(max_active=1, max_per_hour=1)
        spec = JobSpec(overrides={"train.epochs": 2}, idempotency_key=f"deploy-{uuid4().hex}")
        try:
            original, created = await store.create(spec, 3, None, 0, actor=key, quota=quota)
            assert created
            replay, created = await store.create(spec, 3, None, 0, actor=key, quota=quota)
            assert replay.id == original.id and not created
            with pytest.raises(IdempotencyConflictError):
                changed = spec.model_copy(update={"overrides": {"train.epochs": 3}})
                await store.create(changed, 3, None, 0, actor=key, quota=quota)
            with pytest.raises(QuotaExceededError):
                await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_alert_and_operator_jobs_count_against_no_key(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        key = _key("ci")
        quota = JobQuota(max_active=1, max_per_hour=1)
        alert = Actor(kind="alert", name="ModelAccuracyLow")
        try:
            for actor in (alert, alert, Actor(kind="operator", user="ops", host="h")):
                job, _ = await store.create(JobSpec(), 3, None, 0, actor=actor, quota=None)
                assert job.created_by == actor
            _, created = await store.create(JobSpec(), 3, None, 0, actor=key, quota=quota)
            assert created
        finally:
            await store.close()

    asyncio.run(scenario())
    with psycopg.connect(dsn) as conn:
        owners = conn.execute("SELECT owner_key_id, count(*) FROM training_jobs GROUP BY 1 ORDER BY 2").fetchall()
    assert [n for _, n in owners] == [1, 3] and owners[1][0] is None


def test_the_creator_is_recorded_on_the_job_and_its_first_event(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        key = _key("ui")
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=key)
            assert job.created_by == key
            detail = await store.detail(job.id)
            assert detail is not None and detail.created_by == key
            assert [(e.state, e.message, e.actor) for e in detail.events] == [("queued", "accepted", key)]
            assert await store.detail(job.id, owner_key_id=key.key_id) is not None
            assert await store.detail(job.id, owner_key_id="someone-else") is None
            assert [j.id for j in await store.list(owner_key_id=key.key_id)] == [job.id]
            assert await store.list(owner_key_id="someone-else") == []
        finally:
            await store.close()

    asyncio.run(scenario())


def test_the_reason_is_stored_and_opens_the_job_s_history(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        alert = Actor(kind="alert", name="ModelDataDrift")
        reason = "ModelDataDrift: Drift share 0.67 >= 0.5 on adult-income v3"
        try:
            job, _ = await store.create(JobSpec(idempotency_key="episode-1", reason=reason), 3, None, 0, actor=alert)
            assert job.reason == reason
            detail = await store.detail(job.id)
            assert detail is not None and detail.reason == reason
            assert [(e.state, e.message) for e in detail.events] == [("queued", f"accepted: {reason}")]
            # Alertmanager's repeat of the episode, with the figures of the moment: the same job.
            again, created = await store.create(
                JobSpec(idempotency_key="episode-1", reason="ModelDataDrift: Drift share 0.71 >= 0.5"),
                3, None, 0, actor=alert,
            )  # fmt: skip
            assert not created and again.id == job.id and again.reason == reason
            plain, _ = await store.create(JobSpec(), 3, None, 0, actor=alert)
            plain_detail = await store.detail(plain.id)
            assert plain.reason is None and plain_detail is not None
            assert [e.message for e in plain_detail.events] == ["accepted"]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_second_alert_joins_the_retraining_already_queued_for_the_model(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        drift, accuracy = Actor(kind="alert", name="ModelDataDrift"), Actor(kind="alert", name="ModelAccuracyLow")
        try:
            first, _ = await store.create(
                JobSpec(config="adult", idempotency_key="alert:ModelDataDrift:f1:t1", reason="drift"),
                3, None, 0, actor=drift,
            )  # fmt: skip
            # The episode's own replay is not a join: the key returns its job.
            assert await store.join_alert_job("adult", "alert:ModelDataDrift:f1:t1", drift, "drift") is None
            joined = await store.join_alert_job("adult", "alert:ModelAccuracyLow:f2:t2", accuracy, "accuracy 0.2")
            assert joined is not None and joined.id == first.id
            detail = await store.detail(first.id)
            assert detail is not None
            assert [e.message for e in detail.events] == ["accepted: drift", "also requested: accuracy 0.2"]
            assert detail.events[-1].actor is not None and detail.events[-1].actor.name == "ModelAccuracyLow"
            # Another model's config, a job a user queued, or a job that ended: nothing to join.
            assert await store.join_alert_job("fleet", "alert:ModelAccuracyLow:f3:t3", accuracy, None) is None
            user, _ = await store.create(JobSpec(config="fleet", idempotency_key="mine"), 3, None, 0, actor=SYSTEM)
            assert await store.join_alert_job("fleet", "alert:ModelAccuracyLow:f3:t3", accuracy, None) is None
            claimed = await store.claim(first.id, "d1")
            assert claimed is not None
            assert await store.end(first.id, claimed.attempts, JobState.FAILED, "boom")
            assert await store.join_alert_job("adult", "alert:ModelAccuracyLow:f4:t4", accuracy, None) is None
            assert user.state == JobState.QUEUED
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_job_waiting_for_labels_stays_queued_uses_no_attempt_and_is_not_queue_lag(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        drift = Actor(kind="alert", name="ModelDataDrift")
        message = "waiting for 300 labels of m arriving after the job was queued"
        try:
            job, _ = await store.create(JobSpec(idempotency_key="wait-1"), 3, None, 0, actor=drift)
            await store.mark_published(job.id)
            for _ in range(3):  # every look at the labels postpones it again
                assert await store.postpone(job.id, 60, message)
            waiting = await store.get(job.id)
            assert waiting is not None and waiting.state == JobState.QUEUED and waiting.attempts == 0
            assert waiting.waiting_until is not None and waiting.waiting_until > waiting.created_at
            detail = await store.detail(job.id)
            assert detail is not None and [e.message for e in detail.events] == ["accepted", message]
            # Not due: the relay leaves it alone, and the queue is not stalled by it.
            sent: list[JobRecord] = []

            async def publish(record: JobRecord, _: str | None) -> None:
                sent.append(record)

            assert await store.publish_due(publish) == 0 and sent == []
            assert await store.oldest_queued_age_s() == 0.0
            # Its wait over, it is due again and starts its first attempt.
            assert await store.postpone(job.id, 0, message)
            assert await store.publish_due(publish) == 1 and sent[0].id == job.id
            claimed = await store.claim(job.id, "d1")
            assert claimed is not None and claimed.attempts == 1
            assert not await store.postpone(job.id, 60, message)  # no longer queued
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_cancelled_queued_job_is_never_claimed(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        owner = _key("ci")
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=owner)
            cancelled, changed = await store.cancel(job.id, owner, owner_key_id=owner.key_id)
            assert changed and cancelled.state == JobState.CANCELLED and cancelled.finished_at is not None
            assert await store.claim(job.id, "d") is None  # the dispatcher acknowledges and drops its message
            again, changed = await store.cancel(job.id, owner, owner_key_id=owner.key_id)
            assert not changed and again == cancelled  # repeating the cancel changes nothing
            detail = await store.detail(job.id)
            assert detail is not None
            assert [(e.state, e.actor) for e in detail.events] == [("queued", owner), ("cancelled", owner)]
            assert detail.events[-1].message == f"cancelled by key:ci (id {owner.key_id})"
            assert await store.pending_stops(settle_s=0) == ()  # nothing ran, nothing to stop
        finally:
            await store.close()

    asyncio.run(scenario())


def test_only_the_owner_or_an_admin_may_cancel_a_job(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        owner, other = _key("team-a"), _key("team-b")
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=owner)
            alert_job, _ = await store.create(JobSpec(), 3, None, 0, actor=Actor(kind="alert", name="A"))
            for job_id in (job.id, alert_job.id, uuid4()):
                with pytest.raises(JobNotFoundError):
                    await store.cancel(job_id, other, owner_key_id=other.key_id)
            assert (await store.get(job.id)).state == JobState.QUEUED  # type: ignore[union-attr]
            admin = Actor(kind="api_key", key_id="ad0000000000", name="admin")
            cancelled, _ = await store.cancel(alert_job.id, admin, owner_key_id=None)
            assert cancelled.state == JobState.CANCELLED
        finally:
            await store.close()

    asyncio.run(scenario())


def test_a_finished_job_cannot_be_cancelled(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=SYSTEM)
            assert await store.claim(job.id, "d") is not None
            assert await store.succeed(job.id, 1, {"run_id": "r", "model_version": "3"})
            with pytest.raises(JobFinishedError) as refused:
                await store.cancel(job.id, SYSTEM, owner_key_id=None)
            assert refused.value.record.state == JobState.SUCCEEDED and refused.value.record.model_version == "3"
        finally:
            await store.close()

    asyncio.run(scenario())


def test_cancelling_an_attempt_in_flight_ends_it_and_leaves_its_ray_job_to_stop(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=SYSTEM)
            claimed = await store.claim(job.id, "d")
            assert claimed is not None and claimed.ray_job_id is not None
            operator = Actor(kind="operator", user="ops", host="h")
            cancelled, _ = await store.cancel(job.id, operator, owner_key_id=None)
            assert cancelled.state == JobState.CANCELLED
            # The follower's next heartbeat fails, and no late result can overwrite the cancel.
            assert not await store.heartbeat(job.id, 1)
            assert not await store.succeed(job.id, 1, {"run_id": "late"})
            assert await store.pending_stops(settle_s=3600) == ((job.id, claimed.ray_job_id, False),)
            assert await store.confirm_stopped(job.id, claimed.ray_job_id)
            assert await store.pending_stops(settle_s=0) == ()
            assert (await store.get(job.id)).state == JobState.CANCELLED  # type: ignore[union-attr]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_an_attempt_times_out_only_past_its_wall_time(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            job, _ = await store.create(JobSpec(), 3, None, 0, actor=SYSTEM)
            assert await store.claim(job.id, "d") is not None
            assert not await store.time_out(job.id, 1, limit_s=600, actor=SYSTEM)  # by the database's clock
            _set(dsn, job.id, "submitted_at = now() - interval '11 minutes'")
            assert await store.time_out(job.id, 1, limit_s=600, actor=SYSTEM)
            detail = await store.detail(job.id)
            assert detail is not None and detail.state == JobState.TIMED_OUT and detail.state.terminal
            assert detail.events[-1].actor == SYSTEM and "600s" in (detail.events[-1].message or "")
            with pytest.raises(JobFinishedError):
                await store.cancel(job.id, SYSTEM, owner_key_id=None)
            assert [p.job_id for p in await store.pending_stops(settle_s=0)] == [job.id]
        finally:
            await store.close()

    asyncio.run(scenario())


def test_jobs_stored_before_the_migration_read_back_without_a_creator(dsn):
    async def scenario() -> JobRecord | None:
        old = JobStore(dsn, retry_for_s=10)
        old.MIGRATIONS = MIGRATIONS[:1]  # type: ignore[misc]  # the schema as the previous release left it
        await old.open()
        await old.migrate()
        await old.close()
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO training_jobs (id, kind, config, fingerprint, state, max_attempts) "
                "VALUES (%s, 'train', 'adult', 'f', 'failed', 3)",
                (job_id,),
            )
        store = await _store(dsn)
        try:
            return await store.get(job_id)
        finally:
            await store.close()

    job_id = uuid4()
    job = asyncio.run(scenario())
    assert job is not None and job.state == JobState.FAILED and job.created_by is None and job.reason is None


def test_a_job_whose_version_became_the_challenger_is_not_recorded_as_promoted(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            challenger, _ = await store.create(JobSpec(), 3, None, 0, actor=SYSTEM)
            assert await store.claim(challenger.id, "d") is not None
            promotion = {"promote": True, "rollout": "shadow", "reason": "beats it; rolled out as a shadow challenger"}
            assert await store.succeed(challenger.id, 1, {"run_id": "r", "model_version": "4", "promotion": promotion})
            detail = await store.detail(challenger.id)
            assert detail is not None and detail.promoted is False and detail.rollout == "shadow"
            assert "model version 4: rolled out as a shadow challenger" in (detail.events[-1].message or "")
            # A result line from before rollouts: `promote` is the champion's move.
            promoted, _ = await store.create(JobSpec(idempotency_key="old"), 3, None, 0, actor=SYSTEM)
            assert await store.claim(promoted.id, "d") is not None
            assert await store.succeed(
                promoted.id, 1, {"run_id": "r", "model_version": "5", "promotion": {"promote": True}}
            )
            record = await store.get(promoted.id)
            assert record is not None and record.promoted is True and record.rollout is None
        finally:
            await store.close()

    asyncio.run(scenario())
