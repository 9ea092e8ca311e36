"""Accepting training requests: validate, store durably, then publish (transactional outbox)."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime
from uuid import UUID

from core.settings import Settings
from services.training_jobs.broker import Publisher, Topology
from services.training_jobs.models import JobDetail, JobRecord, JobSpec, JobState
from services.training_jobs.store import JobStore

log = logging.getLogger(__name__)

# The accepting process publishes right away; the dispatchers' relay only steps in for jobs still
# unpublished after this long (broker down, or the process died between commit and publish).
PUBLISH_GRACE_S = 15.0


class TrainingJobs:
    def __init__(self, store: JobStore, publisher: Publisher, max_attempts: int, publish_timeout_s: float) -> None:
        self.store = store
        self.publisher = publisher
        self._max_attempts = max_attempts
        self._publish_timeout_s = publish_timeout_s

    @classmethod
    def from_settings(cls, settings: Settings, name: str, store_retry_s: float = 2.0) -> TrainingJobs:
        if settings.database.url is None or settings.amqp.url is None:
            raise RuntimeError("asynchronous training needs DATABASE_URL and AMQP_URL")
        store = JobStore(settings.database.url.get_secret_value(), retry_for_s=store_retry_s, pool_timeout_s=2.0)
        publisher = Publisher(settings.amqp.url.get_secret_value(), Topology.from_settings(settings), name)
        return cls(store, publisher, settings.dispatcher.max_attempts, publish_timeout_s=3.0)

    async def start(self) -> None:
        await self.store.open()
        await self.store.migrate()

    async def close(self) -> None:
        await self.publisher.close()
        await self.store.close()

    async def submit(self, spec: JobSpec, traceparent: str | None, operator: bool = False) -> tuple[JobRecord, bool]:
        """Returns (job, created). Raises InvalidJobSpecError for a spec that cannot run (or that
        changes operator-only settings without `operator`) and IdempotencyConflictError for a reused
        key; a database outage propagates (nothing accepted)."""
        spec.resolve(operator)
        record, created = await self.store.create(spec, self._max_attempts, traceparent, PUBLISH_GRACE_S)
        if created:
            await self._publish_now(record.id, traceparent)
        return record, created

    async def _publish_now(self, job_id: UUID, traceparent: str | None) -> None:
        try:
            await asyncio.wait_for(self.publisher.publish(job_id, traceparent), self._publish_timeout_s)
            await self.store.mark_published(job_id)
        except Exception as exc:
            log.warning(
                "job %s stored but not yet published (%s: %s); the relay will send it", job_id, type(exc).__name__, exc
            )

    async def get(self, job_id: UUID) -> JobDetail | None:
        return await self.store.detail(job_id)

    async def list(self, state: JobState | None, limit: int, before: datetime | None) -> list[JobRecord]:
        return await self.store.list(state, limit, before)
