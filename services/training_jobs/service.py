"""Accepting training requests: validate, store durably, then publish (transactional outbox)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from uuid import UUID

from core.audit import Actor
from core.settings import REPO_ROOT, BatchSettings, JobLimitsSettings, Settings, get_settings
from jobs.batch_config import BatchConfig, LocationError, Locations, ModelRef, plan
from services.training_jobs.admission import ClusterCapacity, DataLocations, admit, live_capacity, override_key
from services.training_jobs.broker import Publisher, Topology
from services.training_jobs.models import (
    InvalidJobSpecError,
    JobDetail,
    JobRecord,
    JobSpec,
    JobState,
    ModelNotAllowedError,
    actor_log_fields,
)
from services.training_jobs.quota import JobQuota
from services.training_jobs.store import JobStore

log = logging.getLogger(__name__)
# The accepting process is a Serve replica: Serve's JSON handler on this logger writes the replica's
# log file, where each accepted or cancelled job is recorded with who did it.
audit_log = logging.getLogger("ray.serve")

# The accepting process publishes right away; the dispatchers' relay only steps in for jobs still
# unpublished after this long (broker down, or the process died between commit and publish).
PUBLISH_GRACE_S = 15.0


def admit_batch(spec: JobSpec, *, admin: bool, limits: BatchSettings, locations: Locations) -> BatchConfig:
    """The config a batch_predict request may run; InvalidJobSpecError naming the field at fault.

    Its input and output must lie in the batch locations (BATCH_DATA_DIR, BATCH_BUCKETS) for every
    caller, admins included: a batch job writes where it is told. A key without the admin scope may
    ask for at most BATCH_MAX_ACTORS actors.
    """
    config = spec.resolve_batch()
    try:
        plan(config, locations)
    except LocationError as exc:
        key = override_key(spec, exc.field)
        if key is None:
            raise InvalidJobSpecError(["body", "config"], f"config {spec.config_name!r}: {exc}") from exc
        raise InvalidJobSpecError(["body", "overrides", key], f"overrides: {exc}") from exc
    if not admin and config.actors is not None and config.actors > limits.max_actors:
        raise InvalidJobSpecError(
            ["body", "overrides", "actors"],
            f"overrides: actors: {config.actors} is above the limit of {limits.max_actors} (BATCH_MAX_ACTORS); "
            "a key with the admin scope may exceed it",
        )
    return config


class TrainingJobs:
    def __init__(
        self,
        store: JobStore,
        publisher: Publisher,
        max_attempts: int,
        publish_timeout_s: float,
        quota: JobQuota | None = None,
        limits: JobLimitsSettings | None = None,
        locations: DataLocations | None = None,
        capacity_of: Callable[[], ClusterCapacity | None] = live_capacity,
        batch: BatchSettings | None = None,
        batch_locations: Locations | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self._max_attempts = max_attempts
        self._publish_timeout_s = publish_timeout_s
        # Applied to jobs of API keys only: the alert webhook's and operators' count against no key.
        self.quota = quota
        self._limits = limits or JobLimitsSettings()
        # Without settings: the repository's data/ only (no object store to point at).
        self._locations = locations or DataLocations(repo_root=REPO_ROOT)
        self._capacity_of = capacity_of
        self._batch = batch or BatchSettings()
        self._batch_locations = batch_locations or Locations.from_settings(get_settings())

    @classmethod
    def from_settings(cls, settings: Settings, name: str, store_retry_s: float = 2.0) -> TrainingJobs:
        if settings.database.url is None or settings.amqp.url is None:
            raise RuntimeError("asynchronous training needs DATABASE_URL and AMQP_URL")
        store = JobStore(settings.database.url.get_secret_value(), retry_for_s=store_retry_s, pool_timeout_s=2.0)
        publisher = Publisher(settings.amqp.url.get_secret_value(), Topology.from_settings(settings), name)
        quota = JobQuota.from_settings(settings.training)
        return cls(
            store,
            publisher,
            settings.dispatcher.max_attempts,
            publish_timeout_s=3.0,
            quota=quota,
            limits=settings.joblimits,
            locations=DataLocations.from_settings(settings),
            batch=settings.batch,
            batch_locations=Locations.from_settings(settings),
        )

    async def start(self) -> None:
        await self.store.open()
        await self.store.migrate()

    async def close(self) -> None:
        await self.publisher.close()
        await self.store.close()

    async def submit(
        self,
        spec: JobSpec,
        traceparent: str | None,
        *,
        actor: Actor,
        operator: bool = False,
        models: frozenset[str] | None = None,
    ) -> tuple[JobRecord, bool]:
        """Returns (job, created); `actor` started it. Raises InvalidJobSpecError for a spec that
        cannot run (reads data outside the data locations, asks for more than the caps or the
        cluster allow, or changes operator-only settings without `operator`: admission.py; a
        batch_predict job: `admit_batch`), ModelNotAllowedError for a job registering (or scoring
        with) a model outside `models` (None: any), IdempotencyConflictError for a reused key, and
        QuotaExceededError for an API key at one of its limits; a database outage propagates
        (nothing accepted)."""
        if spec.kind == "batch_predict":
            batch = admit_batch(spec, admin=operator, limits=self._batch, locations=self._batch_locations)
            assert batch.model is not None  # admit_batch refuses a config without one
            scored = ModelRef.parse(batch.model).name
            if models is not None and scored not in models:
                raise ModelNotAllowedError(scored, models, scores=True)
        else:
            # The cluster's size is one GCS round trip, which must not block the event loop.
            capacity = await asyncio.to_thread(self._capacity_of)
            config = admit(spec, admin=operator, limits=self._limits, capacity=capacity, locations=self._locations)
            if models is not None and config.registered_model_name not in models:
                raise ModelNotAllowedError(config.registered_model_name, models)
        quota = self.quota if actor.kind == "api_key" else None
        record, created = await self.store.create(
            spec, self._max_attempts, traceparent, PUBLISH_GRACE_S, actor=actor, quota=quota
        )
        if created:
            audit_log.info(
                "training job %s accepted from %s",
                record.id,
                actor.label(),
                extra={"job_id": str(record.id), "reason": record.reason, **actor_log_fields(actor)},
            )
            await self._publish_now(record.id, traceparent)
        return record, created

    async def join_alert_job(self, spec: JobSpec, actor: Actor) -> JobRecord | None:
        """The retraining job another alert already has queued or running for the same config, with
        this alert recorded on it; None when there is none (JobStore.join_alert_job)."""
        if spec.idempotency_key is None:
            return None
        record = await self.store.join_alert_job(spec.config_name, spec.idempotency_key, actor, spec.reason)
        if record is not None:
            audit_log.info(
                "training job %s also requested by %s",
                record.id,
                actor.label(),
                extra={"job_id": str(record.id), "reason": spec.reason, **actor_log_fields(actor)},
            )
        return record

    async def cancel(self, job_id: UUID, actor: Actor, owner_key_id: str | None) -> JobRecord:
        """Cancel a job for `actor`. `owner_key_id` None: any job (an admin); else only that key's,
        another's raising JobNotFoundError like an unknown id. A queued job never starts; an
        in-flight one is cancelled at once and its Ray job stopped by the dispatchers. Cancelling
        a cancelled job returns it unchanged; one that ended otherwise raises JobFinishedError."""
        record, cancelled = await self.store.cancel(job_id, actor, owner_key_id)
        if cancelled:
            audit_log.info(
                "training job %s cancelled by %s",
                job_id,
                actor.label(),
                extra={"job_id": str(job_id), **actor_log_fields(actor)},
            )
        return record

    async def _publish_now(self, job_id: UUID, traceparent: str | None) -> None:
        try:
            await asyncio.wait_for(self.publisher.publish(job_id, traceparent), self._publish_timeout_s)
            await self.store.mark_published(job_id)
        except Exception as exc:
            log.warning(
                "job %s stored but not yet published (%s: %s); the relay will send it", job_id, type(exc).__name__, exc
            )

    async def get(self, job_id: UUID, owner_key_id: str | None = None) -> JobDetail | None:
        """The job with its history; with `owner_key_id`, None for another key's job."""
        return await self.store.detail(job_id, owner_key_id)

    async def list(
        self, state: JobState | None, limit: int, before: datetime | None, owner_key_id: str | None = None
    ) -> list[JobRecord]:
        """Newest first; with `owner_key_id`, only that key's jobs."""
        return await self.store.list(state, limit, before, owner_key_id)
