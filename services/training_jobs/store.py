"""Durable training-job records in PostgreSQL.

The row is the source of truth: a job is accepted once its row is committed, and every state
change is a guarded UPDATE (the expected state and attempt are part of the WHERE clause), so
duplicate deliveries and concurrent dispatchers cannot move a job backwards or count an attempt
twice. Rows not yet on the broker are found by the outbox relay (`due_for_publish`).

A cancelled or timed-out job keeps `ray_stop_confirmed_at` empty until its Ray job is known to
have ended: until then the dispatchers' reaper keeps stopping it (`pending_stops`).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NamedTuple, TypeVar
from uuid import UUID, uuid4

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from core.audit import Actor
from core.database import PostgresStore
from core.tracecontext import trace_id_of
from services.training_jobs.models import JobDetail, JobEvent, JobRecord, JobSpec, JobState
from services.training_jobs.quota import HOURLY_WINDOW, JobQuota, active_exceeded, hourly_exceeded

log = logging.getLogger(__name__)
T = TypeVar("T")

_IN_FLIGHT = ("submitted", "running")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE training_jobs (
        id uuid PRIMARY KEY,
        kind text NOT NULL,
        config text NOT NULL,
        overrides jsonb NOT NULL DEFAULT '{}'::jsonb,
        idempotency_key text UNIQUE,
        fingerprint text NOT NULL,
        state text NOT NULL CHECK (state IN
            ('queued', 'submitted', 'running', 'succeeded', 'failed', 'dead_lettered')),
        attempts integer NOT NULL DEFAULT 0,
        max_attempts integer NOT NULL,
        ray_job_id text,
        mlflow_run_id text,
        model_name text,
        model_version text,
        promoted boolean,
        test_metrics jsonb,
        last_error text,
        traceparent text,
        dispatcher text,
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        submitted_at timestamptz,
        started_at timestamptz,
        finished_at timestamptz,
        next_attempt_at timestamptz NOT NULL DEFAULT now(),
        published_at timestamptz,
        heartbeat_at timestamptz
    );
    CREATE INDEX training_jobs_outbox ON training_jobs (next_attempt_at)
        WHERE state = 'queued' AND published_at IS NULL;
    CREATE INDEX training_jobs_in_flight ON training_jobs (heartbeat_at)
        WHERE state IN ('submitted', 'running');
    CREATE INDEX training_jobs_created ON training_jobs (created_at DESC);
    CREATE TABLE training_job_events (
        id bigserial PRIMARY KEY,
        job_id uuid NOT NULL REFERENCES training_jobs (id) ON DELETE CASCADE,
        at timestamptz NOT NULL DEFAULT now(),
        state text NOT NULL,
        attempt integer NOT NULL,
        message text
    );
    CREATE INDEX training_job_events_job ON training_job_events (job_id, id);
    """,
    # Cancellation, wall-time limits, per-key quotas and who did what. Jobs accepted before have no
    # creator and no owner: they count against no key.
    """
    ALTER TABLE training_jobs DROP CONSTRAINT training_jobs_state_check;
    ALTER TABLE training_jobs ADD CONSTRAINT training_jobs_state_check CHECK (state IN
        ('queued', 'submitted', 'running', 'succeeded', 'failed', 'dead_lettered', 'cancelled', 'timed_out'));
    ALTER TABLE training_jobs
        ADD COLUMN created_by jsonb,
        ADD COLUMN owner_key_id text,
        ADD COLUMN ray_stop_confirmed_at timestamptz;
    CREATE INDEX training_jobs_owner ON training_jobs (owner_key_id, created_at);
    CREATE INDEX training_jobs_owner_active ON training_jobs (owner_key_id)
        WHERE state IN ('queued', 'submitted', 'running');
    CREATE INDEX training_jobs_unstopped ON training_jobs (updated_at)
        WHERE state IN ('cancelled', 'timed_out') AND ray_job_id IS NOT NULL AND ray_stop_confirmed_at IS NULL;
    ALTER TABLE training_job_events ADD COLUMN actor jsonb;
    """,
    # Why the job was started (an alert's name and figures, or a user's words); jobs accepted
    # before have none.
    """
    ALTER TABLE training_jobs ADD COLUMN reason text;
    """,
    # Until when a queued job waits for labels before it may start (feedback.wait_s): not due, so
    # neither claimed nor counted as queue lag until then.
    """
    ALTER TABLE training_jobs ADD COLUMN waiting_until timestamptz;
    """,
    # A version the gate passed under a shadow or canary policy: the mode it was handed to the
    # rollout service in. `promoted` is then false (the champion did not move); NULL otherwise.
    """
    ALTER TABLE training_jobs ADD COLUMN rollout text;
    """,
]


def promotion_outcome(result: dict[str, Any]) -> tuple[bool | None, str | None]:
    """(promoted, rollout) from a job's result line: promoted when the gate moved the champion to
    its version; the rollout mode when it made the version the challenger instead. Result lines
    of jobs from before rollouts have no `rollout`: their `promote` is the champion's move."""
    promotion = result.get("promotion")
    if not isinstance(promotion, dict):
        return None, None
    promote = promotion.get("promote")
    rollout = promotion.get("rollout")
    rollout = str(rollout) if rollout and promote else None
    if promote is None:
        return None, rollout
    return bool(promote) and rollout is None, rollout


class IdempotencyConflictError(Exception):
    """An idempotency key reused with a different job spec."""

    def __init__(self, existing: JobRecord) -> None:
        super().__init__(f"idempotency key already used by job {existing.id} with a different spec")
        self.existing = existing


class JobNotFoundError(Exception):
    """No such job, or one the caller may not see (another key's): the two read the same."""

    def __init__(self, job_id: UUID) -> None:
        super().__init__(f"no training job {job_id}")
        self.job_id = job_id


class JobFinishedError(Exception):
    """The job already ended (succeeded, failed, dead-lettered or timed out): nothing to cancel."""

    def __init__(self, record: JobRecord) -> None:
        super().__init__(f"training job {record.id} already ended: {record.state.value}")
        self.record = record


class PendingStop(NamedTuple):
    """A cancelled or timed-out job whose Ray job is not yet known to have ended."""

    job_id: UUID
    ray_job_id: str
    # Unchanged for long enough that no dispatcher can still be about to submit its attempt: a
    # Ray job that does not exist by now never will.
    settled: bool


_INSERT = """
    WITH job AS (
        INSERT INTO training_jobs (id, kind, config, overrides, idempotency_key, fingerprint, state,
            max_attempts, traceparent, next_attempt_at, created_by, owner_key_id, reason)
        VALUES (%(id)s, %(kind)s, %(config)s, %(overrides)s, %(idempotency_key)s, %(fingerprint)s, 'queued',
            %(max_attempts)s, %(traceparent)s, now() + make_interval(secs => %(grace)s), %(actor)s, %(owner)s,
            %(reason)s)
        ON CONFLICT (idempotency_key) DO NOTHING
        RETURNING *
    ), event AS (
        INSERT INTO training_job_events (job_id, state, attempt, message, actor)
        SELECT id, 'queued', 0, %(accepted)s, created_by FROM job
    )
    SELECT * FROM job
"""


class JobStore(PostgresStore):
    """Async access to the job table through a pool that survives server restarts."""

    SCHEMA_TABLE = "training_jobs_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "training-jobs"

    # Accepting ---------------------------------------------------------------------------------

    async def create(
        self,
        spec: JobSpec,
        max_attempts: int,
        traceparent: str | None,
        publish_grace_s: float,
        *,
        actor: Actor,
        quota: JobQuota | None = None,
    ) -> tuple[JobRecord, bool]:
        """Insert a queued job started by `actor`; returns (job, created). A replayed idempotency
        key returns the original job; the same key with a different spec raises
        IdempotencyConflictError. With a quota, an API key's job beyond its limits raises
        QuotaExceededError and nothing is stored; a replay is answered before the limits count."""
        owner = actor.key_id if actor.kind == "api_key" else None
        fingerprint = spec.fingerprint()
        params = {
            "id": uuid4(),
            "kind": spec.kind,
            "config": spec.config_name,
            "overrides": Jsonb(spec.overrides),
            "idempotency_key": spec.idempotency_key,
            "fingerprint": fingerprint,
            "max_attempts": max_attempts,
            "traceparent": traceparent,
            "grace": publish_grace_s,
            "actor": Jsonb(actor.model_dump(exclude_none=True)),
            "owner": owner,
            "reason": spec.reason,
            "accepted": accepted_message(spec),
        }

        async def op(conn: psycopg.AsyncConnection[Any]) -> tuple[JobRecord, bool]:
            if owner is None or quota is None:
                # One statement (atomic on its own), one round trip: the row and its first event.
                async with conn.cursor(row_factory=dict_row) as cur:
                    return await _insert(cur, spec, params)
            async with self._transaction(conn) as cur:
                # Requests of one key take turns from here to the commit, so none counts the
                # others' jobs before they are inserted.
                await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"training-quota:{owner}",))
                replayed = await _replay(cur, spec.idempotency_key, fingerprint)
                if replayed is not None:
                    return replayed, False
                await _check_quota(cur, owner, quota)
                return await _insert(cur, spec, params)

        return await self._retrying(op)

    async def join_alert_job(
        self, config: str, idempotency_key: str, actor: Actor, reason: str | None
    ) -> JobRecord | None:
        """The queued or in-flight job another alert started for `config`, with an event saying this
        alert asked too; None when there is none (or it is this alert episode's own job, which a
        replay of the key returns). One retraining per model at a time: a second alert about the
        same model would train the same data again and race the first to the alias."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> JobRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    SELECT * FROM training_jobs
                    WHERE config = %s AND state IN ('queued', 'submitted', 'running')
                        AND idempotency_key LIKE 'alert:%%' AND idempotency_key <> %s
                    ORDER BY created_at LIMIT 1 FOR UPDATE
                    """,
                    (config, idempotency_key),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                record = _record(row)
                message = f"also requested: {reason}" if reason else "also requested"
                await _event(cur, record.id, record.state, record.attempts, message, actor)
                return record

        return await self._retrying(op)

    async def mark_published(self, job_id: UUID) -> None:
        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "UPDATE training_jobs SET published_at = now() WHERE id = %s AND state = 'queued'", (job_id,)
            )

        await self._retrying(op)

    async def publish_due(self, publish: Callable[[JobRecord, str | None], Awaitable[None]], limit: int = 50) -> int:
        """Outbox relay: hand every due, unpublished job to `publish`, marking each as published
        in the same transaction. Row locks with SKIP LOCKED keep several relays from sending the
        same job; a failed publish rolls back, so the job is tried again on the next round."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> int:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    SELECT * FROM training_jobs
                    WHERE state = 'queued' AND published_at IS NULL AND next_attempt_at <= now()
                    ORDER BY next_attempt_at LIMIT %s FOR UPDATE SKIP LOCKED
                    """,
                    (limit,),
                )
                rows = await cur.fetchall()
                for row in rows:
                    await publish(_record(row), row["traceparent"])
                    await cur.execute("UPDATE training_jobs SET published_at = now() WHERE id = %s", (row["id"],))
                return len(rows)

        return await self._retrying(op)

    async def orphaned(self, heartbeat_timeout_s: float, limit: int = 50) -> list[tuple[JobRecord, str | None]]:
        """In-flight jobs whose follower stopped writing heartbeats: their message was lost with a
        broker that forgot it, or the follower is wedged. Touching the heartbeat hands each out once."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[tuple[JobRecord, str | None]]:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE training_jobs SET heartbeat_at = now()
                    WHERE id IN (
                        SELECT id FROM training_jobs
                        WHERE state IN ('submitted', 'running')
                          AND heartbeat_at < now() - make_interval(secs => %s)
                        LIMIT %s FOR UPDATE SKIP LOCKED)
                    RETURNING *
                    """,
                    (heartbeat_timeout_s, limit),
                )
                return [(_record(r), r["traceparent"]) for r in await cur.fetchall()]

        return await self._retrying(op)

    # Dispatching -------------------------------------------------------------------------------

    async def claim(self, job_id: UUID, dispatcher: str) -> JobRecord | None:
        """Start the next attempt of a queued job; None when it is not queued (someone else has it,
        or it has ended). The attempt number names the Ray submission, so a redelivery of the same
        attempt finds the Ray job it already started."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> JobRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE training_jobs SET state = 'submitted', attempts = attempts + 1,
                        ray_job_id = 'training-' || id::text || '-' || (attempts + 1)::text,
                        dispatcher = %s, submitted_at = now(), heartbeat_at = now(), updated_at = now(),
                        published_at = NULL
                    WHERE id = %s AND state = 'queued'
                    RETURNING *
                    """,
                    (dispatcher, job_id),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                await _event(cur, job_id, JobState.SUBMITTED, row["attempts"], f"ray job {row['ray_job_id']}")
                return _record(row)

        return await self._retrying(op)

    async def get(self, job_id: UUID) -> JobRecord | None:
        async def op(conn: psycopg.AsyncConnection[Any]) -> JobRecord | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SELECT * FROM training_jobs WHERE id = %s", (job_id,))
                row = await cur.fetchone()
            return _record(row) if row else None

        return await self._retrying(op)

    async def traceparent(self, job_id: UUID) -> str | None:
        async def op(conn: psycopg.AsyncConnection[Any]) -> str | None:
            cur = await conn.execute("SELECT traceparent FROM training_jobs WHERE id = %s", (job_id,))
            row = await cur.fetchone()
            return row[0] if row else None

        return await self._retrying(op)

    async def detail(self, job_id: UUID, owner_key_id: str | None = None) -> JobDetail | None:
        """The job and its history; with `owner_key_id`, None for a job of another owner."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> JobDetail | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT * FROM training_jobs WHERE id = %s AND (%s::text IS NULL OR owner_key_id = %s)",
                    (job_id, owner_key_id, owner_key_id),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                await cur.execute(
                    "SELECT at, state, attempt, message, actor FROM training_job_events WHERE job_id = %s ORDER BY id",
                    (job_id,),
                )
                events = [JobEvent.model_validate(e) for e in await cur.fetchall()]
            return JobDetail(**_record(row).model_dump(), events=events)

        return await self._retrying(op)

    async def list(
        self,
        state: JobState | None = None,
        limit: int = 50,
        before: datetime | None = None,
        owner_key_id: str | None = None,
    ) -> list[JobRecord]:
        """Newest first; with `owner_key_id`, only that key's jobs."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[JobRecord]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    """
                    SELECT * FROM training_jobs
                    WHERE (%(state)s::text IS NULL OR state = %(state)s)
                      AND (%(before)s::timestamptz IS NULL OR created_at < %(before)s)
                      AND (%(owner)s::text IS NULL OR owner_key_id = %(owner)s)
                    ORDER BY created_at DESC LIMIT %(limit)s
                    """,
                    {"state": state.value if state else None, "before": before, "limit": limit, "owner": owner_key_id},
                )
                return [_record(r) for r in await cur.fetchall()]

        return await self._retrying(op)

    async def counts(self) -> dict[str, int]:
        async def op(conn: psycopg.AsyncConnection[Any]) -> dict[str, int]:
            cur = await conn.execute("SELECT state, count(*) FROM training_jobs GROUP BY state")
            return {str(state): int(n) for state, n in await cur.fetchall()}

        return await self._retrying(op)

    async def oldest_queued_age_s(self) -> float:
        async def op(conn: psycopg.AsyncConnection[Any]) -> float:
            # A new job is due when accepted (its next_attempt_at only delays the relay); a retry
            # once its backoff has passed.
            # A job that waited for labels is due from the end of its wait.
            cur = await conn.execute(
                """
                SELECT coalesce(extract(epoch FROM now() - min(
                    CASE WHEN attempts = 0 THEN coalesce(waiting_until, created_at) ELSE next_attempt_at END)), 0)
                FROM training_jobs
                WHERE state = 'queued' AND (attempts = 0 OR next_attempt_at <= now())
                    AND (waiting_until IS NULL OR waiting_until <= now())
                """
            )
            row = await cur.fetchone()
            return max(0.0, float(row[0])) if row else 0.0

        return await self._retrying(op)

    async def _in_flight_update(
        self,
        job_id: UUID,
        attempt: int,
        assignments: str,
        params: tuple[Any, ...],
        event: tuple[JobState, str] | None,
        actor: Actor | None = None,
        condition: tuple[str, tuple[Any, ...]] = ("true", ()),
    ) -> bool:
        """Update a job still in flight on this attempt (and meeting `condition`); False when it
        has moved on (a duplicate follower got there first, it was cancelled, or an operator
        intervened)."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    f"UPDATE training_jobs SET {assignments}, updated_at = now() "
                    "WHERE id = %s AND attempts = %s AND state IN ('submitted', 'running') "
                    f"AND {condition[0]} RETURNING id",
                    (*params, job_id, attempt, *condition[1]),
                )
                updated = await cur.fetchone() is not None
                if updated and event is not None:
                    await _event(cur, job_id, event[0], attempt, event[1], actor)
                return updated

        return await self._retrying(op)

    async def note(self, job_id: UUID, attempt: int, state: JobState, message: str) -> bool:
        """An event in the history of a job still in flight on this attempt (what the attempt is
        about to do: the feedback snapshot it trains on, say); False when the job moved on."""
        return await self._in_flight_update(job_id, attempt, "heartbeat_at = now()", (), (state, message))

    async def annotate(self, job_id: UUID, message: str, actor: Actor | None = None) -> bool:
        """An event in the history of a job in any state, its state unchanged: what happened to
        its version after the job (the rollout of its candidate, step by step, and the decision).
        False for an unknown job."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                """
                INSERT INTO training_job_events (job_id, state, attempt, message, actor)
                SELECT id, state, attempts, %s, %s FROM training_jobs WHERE id = %s
                """,
                (message, None if actor is None else Jsonb(actor.model_dump(exclude_none=True)), job_id),
            )
            return cur.rowcount == 1

        return await self._retrying(op)

    async def postpone(self, job_id: UUID, delay_s: float, message: str) -> bool:
        """Leave a queued job queued for `delay_s` more, without using an attempt: the relay
        publishes it again when it is due. The event `message` is written once per job, however
        often the job is postponed with it. False when the job is no longer queued."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE training_jobs SET next_attempt_at = now() + make_interval(secs => %s),
                        waiting_until = now() + make_interval(secs => %s), published_at = NULL, updated_at = now()
                    WHERE id = %s AND state = 'queued' RETURNING attempts
                    """,
                    (delay_s, delay_s, job_id),
                )
                row = await cur.fetchone()
                if row is None:
                    return False
                await cur.execute(
                    "SELECT 1 FROM training_job_events WHERE job_id = %s AND message = %s LIMIT 1", (job_id, message)
                )
                if await cur.fetchone() is None:
                    await _event(cur, job_id, JobState.QUEUED, row["attempts"], message)
                return True

        return await self._retrying(op)

    async def heartbeat(self, job_id: UUID, attempt: int) -> bool:
        return await self._in_flight_update(job_id, attempt, "heartbeat_at = now()", (), None)

    async def mark_running(self, job_id: UUID, attempt: int) -> bool:
        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    "UPDATE training_jobs SET state = 'running', started_at = coalesce(started_at, now()), "
                    "heartbeat_at = now(), updated_at = now() "
                    "WHERE id = %s AND attempts = %s AND state = 'submitted' RETURNING id",
                    (job_id, attempt),
                )
                updated = await cur.fetchone() is not None
                if updated:
                    await _event(cur, job_id, JobState.RUNNING, attempt, None)
                return updated

        return await self._retrying(op)

    async def succeed(self, job_id: UUID, attempt: int, result: dict[str, Any]) -> bool:
        return await self.finish_with_result(job_id, attempt, result, None)

    async def finish_with_result(self, job_id: UUID, attempt: int, result: dict[str, Any], error: str | None) -> bool:
        """The job ran to its end and printed a result: succeeded, or failed for good with `error`
        (the gate refused its version: another attempt would train the same refusal again)."""
        promoted, rollout = promotion_outcome(result)
        metrics = {k: float(v) for k, v in (result.get("test_metrics") or {}).items()}
        state = JobState.SUCCEEDED if error is None else JobState.FAILED
        finished = f"model version {result.get('model_version')}"
        if rollout is not None:
            finished += f": rolled out as a {rollout} challenger (the rollout service decides)"
        return await self._in_flight_update(
            job_id,
            attempt,
            "state = %s, finished_at = now(), mlflow_run_id = %s, model_name = %s, model_version = %s, "
            "promoted = %s, rollout = %s, test_metrics = %s, last_error = %s",
            (
                state.value,
                result.get("run_id"),
                result.get("model_name"),
                None if result.get("model_version") is None else str(result["model_version"]),
                promoted,
                rollout,
                Jsonb(metrics),
                error,
            ),
            (state, error or finished),
        )

    async def schedule_retry(self, job_id: UUID, attempt: int, error: str, delay_s: float) -> bool:
        return await self._in_flight_update(
            job_id,
            attempt,
            "state = 'queued', last_error = %s, next_attempt_at = now() + make_interval(secs => %s), "
            "published_at = NULL, heartbeat_at = NULL",
            (error, delay_s),
            (JobState.QUEUED, f"attempt {attempt} failed, retry in {delay_s:.0f}s: {error}"),
        )

    async def end(self, job_id: UUID, attempt: int, state: JobState, error: str) -> bool:
        """Mark a job failed or dead-lettered after its current attempt."""
        return await self._in_flight_update(
            job_id,
            attempt,
            "state = %s, last_error = %s, finished_at = now()",
            (state.value, error),
            (state, error),
        )

    async def time_out(self, job_id: UUID, attempt: int, limit_s: float, actor: Actor) -> bool:
        """End the attempt as timed_out once it has run past `limit_s` since its submission, by the
        database's clock (a dispatcher's clock may be off); False when not yet due or moved on."""
        error = f"attempt {attempt} ran past the maximum wall time of {limit_s:.0f}s; its Ray job is stopped"
        return await self._in_flight_update(
            job_id,
            attempt,
            "state = 'timed_out', last_error = %s, finished_at = now()",
            (error,),
            (JobState.TIMED_OUT, error),
            actor,
            ("submitted_at <= now() - make_interval(secs => %s)", (limit_s,)),
        )

    async def stopped_outside(self, job_id: UUID, attempt: int, ray_job_id: str) -> bool:
        """Ray reports the attempt's job STOPPED, though nobody cancelled it here: someone ran
        `ray job stop`. A deliberate stop, so the job ends cancelled, not failed, and is not retried."""
        message = f"Ray job {ray_job_id} was stopped outside the platform (not through the API or the CLI)"
        return await self._in_flight_update(
            job_id,
            attempt,
            "state = 'cancelled', last_error = %s, finished_at = now(), ray_stop_confirmed_at = now()",
            (message,),
            (JobState.CANCELLED, message),
        )

    async def cancel(self, job_id: UUID, actor: Actor, owner_key_id: str | None) -> tuple[JobRecord, bool]:
        """Cancel a queued or in-flight job at once; the dispatchers stop its Ray job. Returns (job,
        cancelled now). With `owner_key_id`, another owner's job raises JobNotFoundError as an
        unknown one does. A cancelled job is returned unchanged; one that ended otherwise raises
        JobFinishedError."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> tuple[JobRecord, bool]:
            async with self._transaction(conn) as cur:
                # The row lock orders the cancel with a concurrent claim: whichever commits first,
                # the other sees its state.
                await cur.execute("SELECT * FROM training_jobs WHERE id = %s FOR UPDATE", (job_id,))
                row = await cur.fetchone()
                if row is None or (owner_key_id is not None and row["owner_key_id"] != owner_key_id):
                    raise JobNotFoundError(job_id)
                current = _record(row)
                if current.state == JobState.CANCELLED:
                    return current, False
                if current.state.terminal:
                    raise JobFinishedError(current)
                # A queued job has no Ray job running (an earlier attempt's ended before its retry
                # was scheduled): nothing for the reaper to stop.
                await cur.execute(
                    """
                    UPDATE training_jobs SET state = 'cancelled', finished_at = now(), updated_at = now(),
                        ray_stop_confirmed_at = CASE WHEN state = 'queued' THEN now() END
                    WHERE id = %s RETURNING *
                    """,
                    (job_id,),
                )
                cancelled = await cur.fetchone()
                assert cancelled is not None  # the row is locked
                await _event(
                    cur, job_id, JobState.CANCELLED, cancelled["attempts"], f"cancelled by {actor.label()}", actor
                )
                return _record(cancelled), True

        return await self._retrying(op)

    async def confirm_stopped(self, job_id: UUID, ray_job_id: str) -> bool:
        """Record that the Ray job of a cancelled or timed-out job has ended (or never started)."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE training_jobs SET ray_stop_confirmed_at = now() "
                "WHERE id = %s AND ray_job_id = %s AND state IN ('cancelled', 'timed_out') "
                "AND ray_stop_confirmed_at IS NULL RETURNING id",
                (job_id, ray_job_id),
            )
            return await cur.fetchone() is not None

        return await self._retrying(op)

    async def pending_stops(self, settle_s: float, limit: int = 50) -> tuple[PendingStop, ...]:
        """Cancelled or timed-out jobs whose Ray job may still run; `settled` once the row has not
        changed for `settle_s`, by the database's clock."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> tuple[PendingStop, ...]:
            cur = await conn.execute(
                """
                SELECT id, ray_job_id, updated_at < now() - make_interval(secs => %s) FROM training_jobs
                WHERE state IN ('cancelled', 'timed_out') AND ray_job_id IS NOT NULL
                  AND ray_stop_confirmed_at IS NULL
                ORDER BY updated_at LIMIT %s
                """,
                (settle_s, limit),
            )
            return tuple(
                PendingStop(job_id, ray_job_id, settled) for job_id, ray_job_id, settled in await cur.fetchall()
            )

        return await self._retrying(op)

    async def requeue(self, job_id: UUID, extra_attempts: int, actor: Actor) -> JobRecord | None:
        """Give a dead-lettered or failed job a fresh set of attempts; None if it is in another state.
        Attempt numbers keep counting, so every Ray submission id stays unique."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> JobRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE training_jobs SET state = 'queued', max_attempts = attempts + %s, next_attempt_at = now(),
                        published_at = NULL, heartbeat_at = NULL, finished_at = NULL, updated_at = now()
                    WHERE id = %s AND state IN ('dead_lettered', 'failed')
                    RETURNING *
                    """,
                    (extra_attempts, job_id),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                await _event(cur, job_id, JobState.QUEUED, row["attempts"], f"re-queued by {actor.label()}", actor)
                return _record(row)

        return await self._retrying(op)


def accepted_message(spec: JobSpec) -> str:
    """The first event of a job: why it was started, when its requester said."""
    return "accepted" if spec.reason is None else f"accepted: {spec.reason}"


async def _event(
    cur: psycopg.AsyncCursor[Any],
    job_id: UUID,
    state: JobState,
    attempt: int,
    message: str | None,
    actor: Actor | None = None,
) -> None:
    await cur.execute(
        "INSERT INTO training_job_events (job_id, state, attempt, message, actor) VALUES (%s, %s, %s, %s, %s)",
        (job_id, state.value, attempt, message, None if actor is None else Jsonb(actor.model_dump(exclude_none=True))),
    )


async def _insert(cur: psycopg.AsyncCursor[Any], spec: JobSpec, params: dict[str, Any]) -> tuple[JobRecord, bool]:
    await cur.execute(_INSERT, params)
    row = await cur.fetchone()
    if row is not None:
        return _record(row), True
    replayed = await _replay(cur, spec.idempotency_key, params["fingerprint"])
    if replayed is None:  # pragma: no cover - the conflicting row cannot vanish (no deletes)
        raise RuntimeError("idempotency conflict without a row")
    return replayed, False


async def _replay(cur: psycopg.AsyncCursor[Any], idempotency_key: str | None, fingerprint: str) -> JobRecord | None:
    """The job an idempotency key already names (IdempotencyConflictError for another spec), or None."""
    if idempotency_key is None:
        return None
    await cur.execute("SELECT * FROM training_jobs WHERE idempotency_key = %s", (idempotency_key,))
    existing = await cur.fetchone()
    if existing is None:
        return None
    if existing["fingerprint"] != fingerprint:
        raise IdempotencyConflictError(_record(existing))
    return _record(existing)


async def _check_quota(cur: psycopg.AsyncCursor[Any], owner_key_id: str, quota: JobQuota) -> None:
    """Raise QuotaExceededError when the key is at a limit. The hourly limit goes first: its
    Retry-After is a time before which no retry can succeed, whatever the active jobs do."""
    await cur.execute(
        """
        SELECT now() AS now,
            (SELECT count(*) FROM training_jobs WHERE owner_key_id = %(owner)s
                AND state IN ('queued', 'submitted', 'running')) AS active,
            (SELECT count(*) FROM training_jobs WHERE owner_key_id = %(owner)s
                AND created_at > now() - %(window)s) AS recent
        """,
        {"owner": owner_key_id, "window": HOURLY_WINDOW},
    )
    counts = await cur.fetchone()
    assert counts is not None
    if counts["recent"] >= quota.max_per_hour:
        # One more fits once all but max_per_hour - 1 of the window's jobs have left it.
        await cur.execute(
            """
            SELECT created_at + %(window)s AS leaves FROM training_jobs
            WHERE owner_key_id = %(owner)s AND created_at > now() - %(window)s
            ORDER BY created_at OFFSET %(skip)s LIMIT 1
            """,
            {"owner": owner_key_id, "window": HOURLY_WINDOW, "skip": counts["recent"] - quota.max_per_hour},
        )
        leaving = await cur.fetchone()
        assert leaving is not None
        raise hourly_exceeded(quota.max_per_hour, leaving["leaves"], counts["now"])
    if counts["active"] >= quota.max_active:
        raise active_exceeded(quota.max_active)


def _record(row: dict[str, Any]) -> JobRecord:
    return JobRecord.model_validate({**row, "trace_id": trace_id_of(row.get("traceparent"))})
