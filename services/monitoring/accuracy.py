"""Live accuracy as Prometheus gauges, computed from the feedback stored in PostgreSQL.

Computed in one place from the durable records (not from per-replica counters), so the figure
is the same whichever replica took the feedback, and survives restarts of every process.
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Gauge

from core.settings import Settings
from services.feedback.store import FeedbackStore, VersionAccuracy
from services.monitoring.loop import refresh_forever

log = logging.getLogger(__name__)


class AccuracyGauges:
    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["model", "model_version"]
        self.accuracy = Gauge(
            "model_live_accuracy",
            "Share of correct predictions among the feedback of the window (versions with enough feedback)",
            labels,
            registry=registry,
        )
        self.feedback = Gauge("model_live_feedback", "Feedback received in the window", labels, registry=registry)
        self.threshold = Gauge(
            "model_live_accuracy_threshold", "Live accuracy below which the retrain alert fires", registry=registry
        )
        self.min_feedback = Gauge(
            "model_live_accuracy_min_feedback",
            "Feedback needed in the window before accuracy is published",
            registry=registry,
        )
        self.window = Gauge("model_live_accuracy_window_seconds", "Length of the accuracy window", registry=registry)

    def publish(self, rows: list[VersionAccuracy], min_feedback: int) -> None:
        # Versions whose feedback left the window disappear, so their alerts resolve.
        self.accuracy.clear()
        self.feedback.clear()
        for row in rows:
            self.feedback.labels(row.model_name, row.model_version).set(row.feedback)
            if row.feedback >= min_feedback:
                self.accuracy.labels(row.model_name, row.model_version).set(row.accuracy)


class AccuracyMonitor:
    def __init__(self, settings: Settings, store: FeedbackStore, registry: CollectorRegistry) -> None:
        self._settings = settings
        self.store = store
        self.gauges = AccuracyGauges(registry)
        self.gauges.threshold.set(settings.accuracy.threshold)
        self.gauges.min_feedback.set(settings.accuracy.min_feedback)
        self.gauges.window.set(settings.accuracy.window_s)

    async def refresh(self) -> list[VersionAccuracy]:
        rows = await self.store.live_accuracy(self._settings.accuracy.window_s)
        self.gauges.publish(rows, self._settings.accuracy.min_feedback)
        return rows

    async def run(self) -> None:
        await refresh_forever(self.store, self.refresh, self._settings.accuracy.refresh_s, "live accuracy")
