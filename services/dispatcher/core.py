"""Consume training requests, run each as a Ray job, record the outcome.

Delivery guarantees come from three rules:
- a message is acknowledged only after the job's new state is committed in PostgreSQL;
- each attempt has a deterministic Ray submission id, so a redelivered message (dispatcher
  killed, broker restarted, a second dispatcher) follows the Ray job already started;
- the job row, not the message, holds the state: duplicates and stale messages are recognised
  and dropped, retries are scheduled in the row and re-published by the outbox relay.

A job cancelled (or timed out) while in flight ends in the row at once; its Ray job is stopped by
the dispatcher following it, which sees the row change before and after submitting and on every
heartbeat, and by every dispatcher's reaper for jobs nobody follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractIncomingMessage, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection
from opentelemetry.trace import SpanKind
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential_jitter

from core.audit import Actor
from core.database import TRANSIENT_DB_ERRORS
from core.logs import log_context
from core.settings import BatchSettings, DispatcherSettings, Settings
from core.telemetry import current_traceparent, span_from
from jobs.result import training_result
from services.dispatcher.metrics import DispatcherMetrics
from services.dispatcher.ray_jobs import RayJobs, RayRejectedError, RayUnavailableError, error_summary
from services.dispatcher.snapshots import NoSnapshot, export_snapshot
from services.feedback.store import FeedbackStore
from services.monitoring.accuracy import AccuracyMonitor
from services.monitoring.live import DriftMonitor
from services.rollout.controller import RolloutController
from services.rollout.store import RolloutStore
from services.training_jobs.broker import (
    MalformedMessageError,
    Publisher,
    Topology,
    connect,
    dead_letter_message,
    declare,
    decode,
)
from services.training_jobs.models import (
    HALTED_STATES,
    InvalidJobSpecError,
    JobDetail,
    JobKind,
    JobRecord,
    JobSpec,
    JobState,
    actor_log_fields,
)
from services.training_jobs.store import JobStore, PendingStop

log = logging.getLogger(__name__)
# Ray sends SIGTERM, then SIGKILL after its own short grace period: a job still not ended after
# this long means Ray itself is in trouble, and the follower leaves the job to the reaper.
STOP_WAIT_S = 120.0


@dataclass(frozen=True)
class Outcome:
    # succeeded | refused | failed | unavailable | superseded; cancelled | timed_out (the row ended
    # the attempt, the Ray job was stopped); stopped (someone ran `ray job stop` by hand).
    status: str
    error: str = ""
    result: dict[str, Any] | None = None


def refusal(result: dict[str, Any] | None) -> Outcome | None:
    """A job that failed after printing its result was refused by the promotion gate (jobs.train
    exits 3), or could not run as asked (a batch_predict job's unknown model, unreadable input or
    existing output: jobs.batch_predict exits 4): deterministic, so it ends without a retry, its
    version and the reason on record."""
    if result is None:
        return None
    if result.get("kind") == "batch_predict":
        return Outcome("refused", f"batch prediction refused: {result.get('error') or 'see the job logs'}", result)
    promotion = result.get("promotion") or {}
    reason = promotion.get("reason") if isinstance(promotion, dict) else None
    return Outcome("refused", f"promotion refused: {reason or 'see the job logs'}", result=result)


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Exponential backoff with +-20% jitter, so retries of many jobs do not arrive together."""
    delay = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return float(delay * random.uniform(0.8, 1.2))


def wall_time_limit_s(settings: DispatcherSettings, kind: JobKind, batch: BatchSettings | None = None) -> float:
    if kind == "batch_predict":
        return (batch or BatchSettings()).max_wall_time_s
    return settings.max_wall_time_tune_s if kind == "tune" else settings.max_wall_time_train_s


def batch_summary(result: dict[str, Any]) -> str:
    """The event a finished batch_predict job gets: what it scored, with which version, and where."""
    return (
        f"scored {result.get('rows')} rows ({result.get('rejected_rows')} rejected) with "
        f"{result.get('model_name')} version {result.get('model_version')} into {result.get('output')} "
        f"(rejects: {result.get('rejects')})"
    )


def past_wall_time(submitted_at: datetime | None, now: datetime, limit_s: float) -> bool:
    """Whether an attempt submitted at `submitted_at` (the row's, so a restarted dispatcher keeps
    the clock) has run out of time; time spent waiting for Ray's resources counts."""
    return submitted_at is not None and (now - submitted_at).total_seconds() >= limit_s


def _header(message: AbstractIncomingMessage, name: str) -> str | None:
    value = (message.headers or {}).get(name)
    return value.decode("latin-1") if isinstance(value, bytes) else (str(value) if value is not None else None)


def dispatcher_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class Dispatcher:
    def __init__(self, settings: Settings, store: JobStore, publisher: Publisher, ray: RayJobs) -> None:
        if settings.amqp.url is None:
            raise RuntimeError("the dispatcher needs AMQP_URL")
        self.settings = settings
        self.store = store
        self.publisher = publisher
        self.ray = ray
        self.metrics = DispatcherMetrics()
        self.accuracy: AccuracyMonitor | None = None
        self.drift: DriftMonitor | None = None
        self.rollout: RolloutController | None = None
        if settings.database.url is not None:
            dsn = settings.database.url.get_secret_value()
            feedback = FeedbackStore(dsn, retry_for_s=10.0)
            self.accuracy = AccuracyMonitor(settings, feedback, self.metrics.registry)
            # The same store (one pool): both monitors read the prediction tables. It runs with
            # MONITOR_ENABLED=false too, for the predictions' retention alone.
            self.drift = DriftMonitor(settings, feedback, self.metrics.registry)
            if settings.rollout.enabled:
                # The rollout service (one leader across dispatchers) reads the same tables, and
                # writes its decisions into the jobs' histories through the dispatcher's store.
                self.rollout = RolloutController(
                    settings, RolloutStore(dsn, retry_for_s=10.0), feedback, store, self.metrics.registry
                )
        self.name = dispatcher_name()
        self.topology = Topology.from_settings(settings)
        self._amqp_url = settings.amqp.url.get_secret_value()
        self._active: dict[UUID, asyncio.Future[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None

    # Lifecycle -----------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.store.open()
        await self.store.migrate()
        self._connection = await self._connect()
        self._connection.reconnect_callbacks.add(self._on_reconnect)
        channel = await self._connection.channel()
        self._channel = channel
        await channel.set_qos(prefetch_count=self.settings.dispatcher.concurrency)
        _, queue = await declare(channel, self.topology)
        await queue.consume(self._on_message, no_ack=False)
        log.info(
            "dispatcher %s consuming %s (prefetch %d)",
            self.name,
            self.topology.queue,
            self.settings.dispatcher.concurrency,
        )
        loops = [asyncio.create_task(self._relay_loop()), asyncio.create_task(self._metrics_loop(queue))]
        if self.accuracy is not None:
            loops.append(asyncio.create_task(self.accuracy.run()))
        if self.drift is not None:
            loops.append(asyncio.create_task(self.drift.run()))
        if self.rollout is not None:
            loops.append(asyncio.create_task(self.rollout.run()))
        try:
            await stop.wait()
        finally:
            for task in [*loops, *self._tasks]:
                task.cancel()
            await asyncio.gather(*loops, *self._tasks, return_exceptions=True)
            # Unacknowledged requests go back to the queue; their Ray jobs keep running and the
            # next dispatcher follows them.
            with contextlib.suppress(Exception):
                await self._connection.close()
            await self.publisher.close()
            await self.store.close()
            if self.rollout is not None:
                await self.rollout.close()  # its leadership and its own store
            if self.accuracy is not None:
                await self.accuracy.store.close()  # the drift monitor's too

    async def _connect(self) -> AbstractRobustConnection:
        """The first connection, retried for as long as it takes (the broker may start later)."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type((OSError, aio_pika.exceptions.AMQPError)),
            wait=wait_exponential_jitter(initial=0.5, max=15),
            before_sleep=lambda s: log.warning(
                "broker unreachable (%s); retrying", s.outcome.exception() if s.outcome else "?"
            ),
        ):
            with attempt:
                return await connect(self._amqp_url, f"dispatcher {self.name}")
        raise AssertionError("unreachable")  # pragma: no cover

    def _on_reconnect(self, *_: Any) -> None:
        self.metrics.reconnects.inc()
        log.warning("reconnected to the broker; unacknowledged requests are redelivered")

    # Messages ------------------------------------------------------------------------------------

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        # Each request may run for hours: handle it in its own task, so the consumer keeps taking
        # deliveries up to the prefetch limit and heartbeats keep flowing.
        task = asyncio.create_task(self._handle(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        try:
            job_id = decode(message.body)
        except MalformedMessageError as exc:
            await self._dead_letter(message, f"malformed message: {exc}", None, "malformed")
            return
        with (
            log_context(job_id=str(job_id)),
            span_from(
                "training_job.dispatch",
                _header(message, "traceparent"),
                SpanKind.CONSUMER,
                {"training_job.id": str(job_id), "messaging.destination.name": self.topology.queue},
            ),
        ):
            await self._handle_job(job_id, message)

    async def _handle_job(self, job_id: UUID, message: AbstractIncomingMessage) -> None:
        running = self._active.get(job_id)
        if running is not None:
            # A redelivery (the broker connection dropped) of a job this process is following.
            await asyncio.shield(running)
            await self._ack(message)
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._active[job_id] = done
        self.metrics.in_flight.inc()
        try:
            await self._process(job_id, message)
        except TRANSIENT_DB_ERRORS as exc:
            # The database stayed away longer than the store retries: hand the request back.
            log.error("job %s: database unavailable (%s); returning the request to the queue", job_id, exc)
            await self._nack(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("job %s: unexpected error; returning the request to the queue", job_id)
            await self._nack(message)
        finally:
            self.metrics.in_flight.dec()
            done.set_result(None)
            del self._active[job_id]

    async def _process(self, job_id: UUID, message: AbstractIncomingMessage) -> None:
        job = await self.store.get(job_id)
        if job is None:
            await self._dead_letter(message, f"unknown training job {job_id}", job_id, "unknown_job")
            return
        if job.state.terminal:
            await self._ack(message)  # a duplicate of a finished job
            return
        if job.state == JobState.QUEUED:
            now = datetime.now(UTC)
            if job.attempts > 0 and job.next_attempt_at and job.next_attempt_at > now:
                await self._ack(message)  # stale copy; the relay re-publishes the retry when it is due
                return
            if job.waiting_until and job.waiting_until > now:
                await self._ack(message)  # a copy from before it began to wait: the relay re-publishes it
                return
            if await self._waits_for_labels(job):
                await self._ack(message)
                return
            claimed = await self.store.claim(job_id, self.name)
            if claimed is None:
                await self._process_again(job_id, message)
                return
            job = claimed
            # A first attempt waited since it was accepted; a retry since its backoff ended.
            due = job.created_at if job.attempts == 1 or job.next_attempt_at is None else job.next_attempt_at
            self.metrics.queue_wait.observe(max(0.0, (datetime.now(UTC) - due).total_seconds()))
        else:
            log.info("job %s: resuming attempt %d (%s) after a redelivery", job_id, job.attempts, job.ray_job_id)
        await self._finish(job, message, await self._run_attempt(job))

    async def _process_again(self, job_id: UUID, message: AbstractIncomingMessage) -> None:
        """Lost the claim race: the job just moved on. Follow it if in flight, else drop the copy."""
        job = await self.store.get(job_id)
        if job is None or job.state.terminal or job.state == JobState.QUEUED:
            await self._ack(message)
            return
        await self._finish(job, message, await self._run_attempt(job))

    async def _run_attempt(self, job: JobRecord) -> Outcome:
        assert job.ray_job_id is not None
        started = time.monotonic()
        # The Ray job continues this dispatch span's trace (the request's trace, through the queue).
        traceparent = current_traceparent() or await self.store.traceparent(job.id)
        unreachable_since: float | None = None
        submitted = False
        marked_running = job.state == JobState.RUNNING
        last_heartbeat = time.monotonic()
        spec: JobSpec | None = None
        while True:
            # Cancelled since the claim: the attempt never reaches Ray.
            if not submitted and (halted := await self._halted(job)) is not None:
                return await self._halt(job, halted)
            if await self._time_out_if_due(job):
                return await self._halt(job, await self._halted(job))
            try:
                if not submitted:
                    if spec is None:
                        prepared = await self._submission_spec(job)
                        if isinstance(prepared, Outcome):
                            return prepared
                        spec = prepared
                    status = await self.ray.ensure_submitted(job.ray_job_id, spec, job.id, traceparent, job.created_by)
                    submitted = True
                    log.info("job %s: attempt %d is Ray job %s", job.id, job.attempts, job.ray_job_id)
                    # Cancelled while being submitted: stop it before it gets anywhere.
                    if (halted := await self._halted(job)) is not None:
                        return await self._halt(job, halted)
                else:
                    found = await self.ray.status(job.ray_job_id)
                    if found is None:
                        return Outcome("failed", f"Ray lost job {job.ray_job_id} (head restarted?)")
                    status = found
                unreachable_since = None
            except RayRejectedError as exc:
                return Outcome("failed", f"Ray refused the job: {exc}")
            except RayUnavailableError as exc:
                now = time.monotonic()
                unreachable_since = unreachable_since or now
                if now - unreachable_since > self.settings.dispatcher.ray_unreachable_s:
                    return Outcome("unavailable", str(exc))
                log.warning("job %s: %s; retrying", job.id, exc)
                await asyncio.sleep(min(10.0, 1.0 + (now - unreachable_since) / 2))
                continue
            if status.status == "RUNNING" and not marked_running:
                marked_running = await self.store.mark_running(job.id, job.attempts) or marked_running
            if status.terminal:
                # STOPPED by the reaper for a cancel or a timeout this follower has not seen yet.
                if status.status == "STOPPED" and (halted := await self._halted(job)) is not None:
                    return await self._halt(job, halted)
                return await self._ended(job, status.status, status.message, time.monotonic() - started)
            if time.monotonic() - last_heartbeat >= self.settings.dispatcher.poll_interval_s:
                if not await self.store.heartbeat(job.id, job.attempts):
                    halted = await self._halted(job)
                    return await self._halt(job, halted) if halted is not None else Outcome("superseded")
                last_heartbeat = time.monotonic()
            await asyncio.sleep(self.settings.dispatcher.poll_interval_s)

    async def _waits_for_labels(self, job: JobRecord) -> bool:
        """Postpone a queued job whose config waits for labels (`feedback.wait_s`, set for the jobs
        of the alerts that fire before any label) while fewer than `feedback.min_rows` labels of
        its model arrived after it was queued; it stays queued, using no attempt. After `wait_s`
        it goes ahead with whatever feedback there is. True when postponed."""
        if job.kind == "batch_predict":
            return False  # it trains nothing
        try:
            config = job.spec().resolve(operator=True)
        except (InvalidJobSpecError, ValueError, OSError):
            return False  # the attempt fails on the config and says why
        wait = config.feedback
        if not wait.enabled or wait.wait_s <= 0 or config.data.feedback_uri is not None or self.accuracy is None:
            return False
        waited_s = (datetime.now(UTC) - job.created_at).total_seconds()
        if waited_s >= wait.wait_s:
            return False
        model = config.registered_model_name
        await self.accuracy.store.open()  # no-op once the monitor has opened it
        arrived = await self.accuracy.store.labels_since(model, job.created_at)
        if arrived >= wait.min_rows:
            return False
        delay = min(wait.wait_s - waited_s, 2 * self.settings.dispatcher.poll_interval_s)
        message = (
            f"waiting for {wait.min_rows} labels of {model} arriving after the job was queued "
            f"(at most {wait.wait_s:.0f} s; then it trains on the feedback there is)"
        )
        if await self.store.postpone(job.id, delay, message):
            log.info("job %s: %d of %d labels of %s so far; waiting", job.id, arrived, wait.min_rows, model)
            return True
        return False

    async def _submission_spec(self, job: JobRecord) -> JobSpec | Outcome:
        """What this attempt submits: the job's spec, plus its feedback snapshot (`data.feedback_uri`
        and `data.feedback_sha256`) when its effective config has `feedback.enabled` and names none.
        The snapshot is exported before the attempt's first submission (a retry reuses its job's);
        an export that fails fails the attempt, never letting the job train without its feedback."""
        assert job.ray_job_id is not None
        spec = job.spec()
        if spec.kind == "batch_predict":
            return spec  # no training data, no feedback snapshot
        try:
            config = spec.resolve(operator=True)
        except (InvalidJobSpecError, ValueError, OSError):
            return spec  # the Ray job fails on the config and says why, as it would without feedback
        if not config.feedback.enabled or config.data.feedback_uri is not None:
            return spec
        if await self.ray.status(job.ray_job_id) is not None:
            return spec  # submitted before this dispatcher took over: with its snapshot already
        model = config.registered_model_name
        if self.accuracy is None:
            return Outcome("failed", f"feedback of {model} cannot be exported: the dispatcher has no DATABASE_URL")
        try:
            await self.accuracy.store.open()  # no-op once the monitor has opened it
            export = await export_snapshot(self.accuracy.store, self.settings, config, job.id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Outcome(
                "failed",
                f"feedback snapshot of {model} could not be exported (the job trains on feedback only with it): "
                f"{type(exc).__name__}: {exc}",
            )
        message = export.describe()
        # An event of the attempt, in the job's history next to its submission.
        await self.store.note(job.id, job.attempts, JobState.SUBMITTED, message)
        log.info("job %s: %s", job.id, message)
        if isinstance(export, NoSnapshot):
            return spec
        return spec.model_copy(update={"overrides": {**spec.overrides, **export.overrides()}})

    async def _halted(self, job: JobRecord) -> JobDetail | None:
        """The job as stored, when this attempt was cancelled or timed out; else None."""
        current = await self.store.detail(job.id)
        if current is None or current.attempts != job.attempts or current.state not in HALTED_STATES:
            return None
        return current

    async def _time_out_if_due(self, job: JobRecord) -> bool:
        limit_s = wall_time_limit_s(self.settings.dispatcher, job.kind, self.settings.batch)
        if not past_wall_time(job.submitted_at, datetime.now(UTC), limit_s):
            return False
        actor = Actor.system()
        # Guarded by the database's clock too: False if it disagrees, or the job moved on.
        if not await self.store.time_out(job.id, job.attempts, limit_s, actor):
            return False
        log.warning(
            "job %s: attempt %d ran past the maximum wall time of %.0fs; stopping Ray job %s",
            job.id,
            job.attempts,
            limit_s,
            job.ray_job_id,
            extra=actor_log_fields(actor),
        )
        return True

    async def _halt(self, job: JobRecord, halted: JobDetail | None) -> Outcome:
        """The row ended the attempt (cancelled, or timed out): stop its Ray job and wait until Ray
        says it has ended. Nothing more is recorded on the job; the reaper finishes what this leaves."""
        assert job.ray_job_id is not None
        if halted is None:  # timed out, then moved on again: only an operator could do that
            return Outcome("superseded")
        by = next((e.actor for e in reversed(halted.events) if e.state == halted.state), None)
        log.info(
            "job %s %s%s; stopping Ray job %s",
            job.id,
            halted.state.value,
            f" by {by.label()}" if by else "",
            job.ray_job_id,
            extra=actor_log_fields(by) if by else {},
        )
        if await self._stop_ray_job(job.ray_job_id):
            await self.store.confirm_stopped(job.id, job.ray_job_id)
        if job.submitted_at is not None:
            elapsed_s = (datetime.now(UTC) - job.submitted_at).total_seconds()
            self.metrics.duration.labels(job.kind, halted.state.value).observe(max(0.0, elapsed_s))
        return Outcome(halted.state.value, halted.last_error or "")

    async def _stop_ray_job(self, ray_job_id: str) -> bool:
        """Stop the Ray job and wait for its end; True once Ray reports it ended. False when Ray has
        never heard of it (it may yet be submitted by a dispatcher about to: the reaper settles
        that), or did not stop it in time."""
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            try:
                await self.ray.stop(ray_job_id)
                status = await self.ray.status(ray_job_id)
            except RayUnavailableError as exc:
                log.warning("Ray job %s: could not stop it yet (%s)", ray_job_id, exc)
            else:
                if status is None or status.terminal:
                    return status is not None
            await asyncio.sleep(self.settings.dispatcher.poll_interval_s)
        log.warning(
            "Ray job %s still running %.0fs after a stop; the reaper keeps stopping it", ray_job_id, STOP_WAIT_S
        )
        return False

    async def _ended(self, job: JobRecord, status: str, message: str, elapsed_s: float) -> Outcome:
        assert job.ray_job_id is not None
        try:
            logs = await self.ray.logs(job.ray_job_id)
        except RayUnavailableError as exc:
            logs = f"(logs unavailable: {exc})"
        if status == "SUCCEEDED":
            result = training_result(logs)
            outcome = (
                Outcome("succeeded", result=result)
                if result is not None
                else Outcome("failed", "the job ended without a TRAINING_RESULT line")
            )
        elif status == "STOPPED":
            outcome = Outcome("stopped", f"Ray job {job.ray_job_id} was stopped outside the platform")
        else:
            outcome = refusal(training_result(logs)) or Outcome("failed", error_summary(logs, message))
        self.metrics.duration.labels(job.kind, outcome.status).observe(elapsed_s)
        return outcome

    async def _finish(self, job: JobRecord, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        self.metrics.attempts.labels(job.kind, outcome.status).inc()
        if outcome.status == "succeeded":
            assert outcome.result is not None
            if job.kind == "batch_predict":
                # Registers and promotes nothing: the record keeps the run and the version used.
                await self.store.note(job.id, job.attempts, JobState.RUNNING, batch_summary(outcome.result))
            await self.store.succeed(job.id, job.attempts, outcome.result)
            log.info("job %s succeeded: model version %s", job.id, outcome.result.get("model_version"))
        elif outcome.status == "refused":
            assert outcome.result is not None
            await self.store.finish_with_result(job.id, job.attempts, outcome.result, outcome.error)
            log.error("job %s failed without retry: %s", job.id, outcome.error)
        elif outcome.status == "stopped":
            # `ray job stop` by hand is a deliberate end: cancelled, not failed, and not retried.
            assert job.ray_job_id is not None
            if await self.store.stopped_outside(job.id, job.attempts, job.ray_job_id):
                log.warning("job %s cancelled: %s", job.id, outcome.error)
        elif outcome.status in {"failed", "unavailable"}:
            if job.attempts < job.max_attempts:
                delay = backoff_s(
                    job.attempts, self.settings.dispatcher.backoff_base_s, self.settings.dispatcher.backoff_max_s
                )
                await self.store.schedule_retry(job.id, job.attempts, outcome.error, delay)
                log.warning("job %s attempt %d failed; retry in %.0fs: %s", job.id, job.attempts, delay, outcome.error)
            else:
                error = f"gave up after {job.attempts} attempts: {outcome.error}"
                # The dead-letter copy goes first: should the row update fail, the redelivered
                # request arrives here again, rather than a dead job without its message.
                await self.publisher.dead_letter(
                    dead_letter_message(message.body, dict(message.headers or {}), error, job.id)
                )
                self.metrics.dead_lettered.labels("attempts_exhausted").inc()
                await self.store.end(job.id, job.attempts, JobState.DEAD_LETTERED, error)
                log.error("job %s dead-lettered: %s", job.id, error)
        # cancelled, timed_out, superseded: the row holds the end already; only the message is left.
        await self._ack(message)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, reason: str, job_id: UUID | None, label: str
    ) -> None:
        log.error("dead-lettering a request: %s", reason)
        try:
            await self.publisher.dead_letter(
                dead_letter_message(message.body, dict(message.headers or {}), reason, job_id)
            )
        except Exception:
            log.exception("could not publish to the dead-letter queue; rejecting to the broker's dead-letter exchange")
            await self._nack(message, requeue=False)
            return
        self.metrics.dead_lettered.labels(label).inc()
        await self._ack(message)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        try:
            await message.ack()
        except Exception as exc:
            log.warning("ack lost with its channel (%s); the redelivered copy will be recognised", exc)

    async def _nack(self, message: AbstractIncomingMessage, requeue: bool = True) -> None:
        try:
            await message.nack(requeue=requeue)
        except Exception as exc:
            log.warning("nack lost with its channel (%s); the broker redelivers", exc)

    # Background loops ----------------------------------------------------------------------------

    async def _relay_loop(self) -> None:
        """The outbox relay: publish jobs that are due but not on the broker (retries, or requests
        accepted while the broker was down), and re-publish in-flight jobs nobody is following;
        then the reaper."""
        while True:
            for name, step in (("relay", self._relay_round), ("reaper", self.reap_round)):
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("%s round failed: %s: %s", name, type(exc).__name__, exc)
            await asyncio.sleep(self.settings.dispatcher.poll_interval_s)

    async def _relay_round(self) -> None:
        sent = await self.store.publish_due(self._publish_record)
        if sent:
            self.metrics.relayed.labels("due").inc(sent)
        for job, traceparent in await self.store.orphaned(self.settings.dispatcher.heartbeat_timeout_s):
            if job.id not in self._active:
                await self.publisher.publish(job.id, traceparent)
                self.metrics.relayed.labels("orphaned").inc()
                log.warning("job %s: no heartbeat; re-published", job.id)

    async def reap_round(self) -> None:
        """Stop the Ray jobs of cancelled and timed-out jobs that no follower saw end: its
        dispatcher died, or the job was cancelled while nobody followed it."""
        # A dispatcher that claimed the job may still submit its attempt until it next looks at
        # the row; by two heartbeat timeouts it has (or its claim was handed to another).
        settle_s = 2 * self.settings.dispatcher.heartbeat_timeout_s
        for pending in await self.store.pending_stops(settle_s):
            if pending.job_id not in self._active:  # a follower here stops it itself
                await self._reap(pending)

    async def _reap(self, pending: PendingStop) -> None:
        status = await self.ray.status(pending.ray_job_id)
        if status is None and not pending.settled:
            return
        if status is None or status.terminal:
            await self.store.confirm_stopped(pending.job_id, pending.ray_job_id)
            return
        await self.ray.stop(pending.ray_job_id)
        log.info("job %s: stopping Ray job %s (the job ended here)", pending.job_id, pending.ray_job_id)

    async def _publish_record(self, job: JobRecord, traceparent: str | None) -> None:
        await asyncio.wait_for(self.publisher.publish(job.id, traceparent), 10)

    async def _metrics_loop(self, queue: AbstractQueue) -> None:
        while True:
            try:
                self.metrics.set_counts(await self.store.counts())
                self.metrics.queue_lag.set(await self.store.oldest_queued_age_s())
                if self._channel is not None and not self._channel.is_closed:
                    for name in (self.topology.queue, self.topology.dead_letter_queue):
                        declared = await self._channel.declare_queue(name, passive=True)
                        count = declared.declaration_result.message_count
                        self.metrics.queue_messages.labels(name).set(count or 0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.debug("metrics round failed: %s", exc)
            await asyncio.sleep(5)
