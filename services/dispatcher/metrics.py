"""Prometheus metrics of the dispatcher, on their own registry (no import-time global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from services.training_jobs.models import JobState

DEAD_LETTER_REASONS = ("attempts_exhausted", "malformed", "unknown_job")
# Attempts the platform ended (cancelled through the API or the CLI, or past their wall time) and
# those stopped by hand with `ray job stop` (recorded as cancelled).
HALT_OUTCOMES = ("cancelled", "timed_out", "stopped")
JOB_KINDS = ("train", "tune")
_DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
_WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)


class DispatcherMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Gauge("training_jobs", "Training jobs by state (from the job store)", ["state"], registry=r)
        self.queue_messages = Gauge(
            "training_queue_messages", "Messages ready in the request and dead-letter queues", ["queue"], registry=r
        )
        self.queue_lag = Gauge(
            "training_queue_lag_seconds", "Age of the oldest due job that no dispatcher has claimed", registry=r
        )
        self.queue_wait = Histogram(
            "training_job_queue_wait_seconds", "From due to claimed", buckets=_WAIT_BUCKETS, registry=r
        )
        self.attempts = Counter(
            "training_job_attempts", "Finished attempts by kind and outcome", ["kind", "outcome"], registry=r
        )
        self.duration = Histogram(
            "training_job_duration_seconds",
            "Wall time of an attempt, submission to end",
            ["kind", "outcome"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.dead_lettered = Counter(
            "training_dead_lettered_messages", "Messages sent to the dead-letter queue", ["reason"], registry=r
        )
        self.in_flight = Gauge("training_dispatcher_in_flight", "Jobs this dispatcher is running now", registry=r)
        self.reconnects = Counter(
            "training_dispatcher_reconnects", "Broker reconnections after a lost connection", registry=r
        )
        self.relayed = Counter(
            "training_outbox_published", "Jobs published by the outbox relay", ["reason"], registry=r
        )
        for state in JobState:
            self.jobs.labels(state.value)
        # Series exist from the start, so alert rules see 0 and then an increase, not a gap.
        for reason in DEAD_LETTER_REASONS:
            self.dead_lettered.labels(reason)
        for kind in JOB_KINDS:
            for outcome in HALT_OUTCOMES:
                self.attempts.labels(kind, outcome)

    def serve(self, host: str, port: int) -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def set_counts(self, counts: dict[str, int]) -> None:
        for state in JobState:
            self.jobs.labels(state.value).set(counts.get(state.value, 0))
