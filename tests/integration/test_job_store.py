"""The job store on this machine's PostgreSQL: claims, retries and the outbox under concurrency."""

import asyncio
from collections.abc import Iterator

import pytest

from cluster.sandbox import temporary_database
from services.training_jobs.models import JobRecord, JobSpec, JobState
from services.training_jobs.store import IdempotencyConflictError, JobStore


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
            job, _ = await stores[0].create(JobSpec(), max_attempts=3, traceparent=None, publish_grace_s=0)
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
            results = await asyncio.gather(*(store.create(spec, 3, None, 0) for _ in range(5)))
            assert len({job.id for job, _ in results}) == 1
            assert sum(created for _, created in results) == 1
            with pytest.raises(IdempotencyConflictError):
                await store.create(spec.model_copy(update={"overrides": {"train.epochs": 3}}), 3, None, 0)
        finally:
            await store.close()

    asyncio.run(scenario())


def test_failed_attempts_are_retried_then_end_and_stale_updates_are_ignored(dsn):
    async def scenario() -> None:
        store = await _store(dsn)
        try:
            job, _ = await store.create(JobSpec(), max_attempts=2, traceparent="tp", publish_grace_s=0)
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
            requeued = await store.requeue(job.id, extra_attempts=2)
            assert requeued is not None and requeued.state == JobState.QUEUED and requeued.max_attempts == 4
            assert await store.requeue(job.id, extra_attempts=2) is None  # only ended jobs
        finally:
            await store.close()

    asyncio.run(scenario())


def test_outbox_hands_each_due_job_to_one_relay(dsn):
    async def scenario() -> list[list[str]]:
        stores = [await _store(dsn) for _ in range(3)]
        try:
            for _ in range(20):
                await stores[0].create(JobSpec(), 3, None, publish_grace_s=0)
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
