"""The rollout service's Prometheus series, on the dispatcher's registry (served on its metrics
port). Gauges are set from the rollouts' records in PostgreSQL by the leading service only: a
stand-by clears them, so that scraping every dispatcher never counts a rollout twice."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge

from services.rollout.models import RolloutRecord


class RolloutMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.active = Gauge(
            "model_rollout_active",
            "1 while a shadow or canary rollout of the challenger version runs",
            ["model", "mode", "challenger_version"],
            registry=registry,
        )
        self.canary_share = Gauge(
            "model_rollout_canary_share",
            "Share of the traffic the canary challenger answers (0 for a shadow)",
            ["model"],
            registry=registry,
        )
        self.step = Gauge(
            "model_rollout_step", "Index of the rollout's current canary step", ["model"], registry=registry
        )
        self.agreement = Gauge(
            "model_shadow_agreement",
            "Share of paired rows on which the challenger agrees with the champion, current window",
            ["model", "challenger_version"],
            registry=registry,
        )
        self.rows = Gauge(
            "model_shadow_rows",
            "Paired rows (served and mirrored) of the current window",
            ["model", "challenger_version"],
            registry=registry,
        )
        self.accuracy = Gauge(
            "model_rollout_accuracy",
            "Accuracy of each version of a rollout on the same labelled paired rows, current window",
            ["model", "model_version", "role"],
            registry=registry,
        )
        self.decisions = Counter(
            "model_rollout_decisions",
            "Rollout and probation decisions (next_step, promoted, rejected, rolled_back, passed, ...)",
            ["model", "outcome"],
            registry=registry,
        )
        self.rollbacks = Counter(
            "model_rollbacks", "Automatic rollbacks of a champion on probation", ["model"], registry=registry
        )
        self.last_rollback = Gauge(
            "model_last_rollback_timestamp_seconds",
            "When the model's latest automatic rollback happened",
            ["model", "model_version", "restored_version"],
            registry=registry,
        )
        self.probation = Gauge(
            "model_probation_active",
            "1 while a new champion is on probation",
            ["model", "model_version"],
            registry=registry,
        )
        self.leader = Gauge(
            "rollout_service_leader", "1 in the dispatcher that runs the rollout service", registry=registry
        )

    def publish(self, active: list[RolloutRecord], rollbacks: list[RolloutRecord]) -> None:
        """The gauges from the records: rollouts that ended disappear, so their series go away."""
        self.clear()
        self.leader.set(1)
        for record in active:
            if record.kind == "probation":
                self.probation.labels(record.model_name, record.challenger_version).set(1)
                continue
            model, challenger = record.model_name, record.challenger_version
            self.active.labels(model, record.kind, challenger).set(1)
            self.canary_share.labels(model).set(record.share)
            self.step.labels(model).set(record.step)
            figures = record.figures
            if isinstance(figures.get("rows"), int):
                self.rows.labels(model, challenger).set(figures["rows"])
            if isinstance(figures.get("agreement"), int | float):
                self.agreement.labels(model, challenger).set(figures["agreement"])
            for role, version in (("champion", record.champion_version), ("challenger", challenger)):
                value = figures.get(f"{role}_accuracy")
                # NaN until labelled paired rows exist: the series is there for the whole rollout,
                # and no figure is made up before there is one.
                measured = float(value) if isinstance(value, int | float) else math.nan
                self.accuracy.labels(model, version, role).set(measured)
        for record in rollbacks:
            if record.ended_at is not None:
                self.last_rollback.labels(record.model_name, record.challenger_version, record.champion_version).set(
                    record.ended_at.timestamp()
                )

    def clear(self) -> None:
        for gauge in (
            self.active,
            self.canary_share,
            self.step,
            self.agreement,
            self.rows,
            self.accuracy,
            self.last_rollback,
            self.probation,
        ):
            gauge.clear()
        self.leader.set(0)
