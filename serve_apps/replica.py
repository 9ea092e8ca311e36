"""What one ingress replica holds for its routes: the settings it was started with, the models it
serves and their batching, the prediction recorder, and the training-job service. The deployment
(serve_apps/ingress.py) builds it once; routes reach it through a FastAPI dependency."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.settings import Settings
from serve_apps.champion import BatchResult, ChampionModel
from serve_apps.errors import FeedbackDisabledError, TrainingJobsDisabledError
from serve_apps.fleet import ModelFleet
from serve_apps.metrics import IngressMetrics
from services.feedback.recorder import PredictionRecorder
from services.feedback.store import FeedbackStore
from services.training_jobs.service import TrainingJobs

log = logging.getLogger("ray.serve")


class ServingKnobs(BaseModel):
    """The deployment's `user_config` in the Serve config: Serve hands it to `reconfigure` on every
    replica when it changes, so these take effect without restarting a replica."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(ge=1)
    batch_wait_timeout_s: float = Field(ge=0)
    poll_interval_s: float = Field(gt=0)
    max_rows: int = Field(ge=1)


@dataclass
class Replica:
    settings: Settings
    fleet: ModelFleet
    metrics: IngressMetrics
    # One request's rows for one model, joined with other requests' by @serve.batch.
    predict_batch: Callable[[tuple[ChampionModel, list[dict[str, Any]]]], Awaitable[BatchResult]]
    max_rows: int
    _recorder: PredictionRecorder | None = None
    _jobs: TrainingJobs | None = None
    _jobs_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def champion(self) -> ChampionModel:
        """The default model (`MODEL_NAME`): what /v1/predict and /v1/models/current answer with."""
        return self.fleet.default

    def prediction_recorder(self) -> PredictionRecorder | None:
        """Created on first use in the serving loop; connects and migrates in the background so
        that predictions never wait on PostgreSQL. None without a database."""
        database = self.settings.database.value()
        if database is None:
            return None
        if self._recorder is None:
            prediction = self.settings.prediction
            self._recorder = PredictionRecorder(
                FeedbackStore(database),
                prediction.flush_interval_s,
                prediction.buffer_rows,
                on_dropped=lambda n: self.metrics.records_dropped.inc(n),
            )
            self._recorder.start()
        return self._recorder

    def feedback_recorder(self) -> PredictionRecorder:
        recorder = self.prediction_recorder()
        if recorder is None:
            raise FeedbackDisabledError
        return recorder

    async def training_jobs(self) -> TrainingJobs:
        """Connect on first use, so the inference API starts and serves without PostgreSQL or
        RabbitMQ. Errors map to responses through the app's exception handlers."""
        if not self.settings.training_jobs_enabled:
            raise TrainingJobsDisabledError
        async with self._jobs_lock:
            if self._jobs is None:
                jobs = TrainingJobs.from_settings(self.settings, name=f"inference-api {uuid.uuid4().hex[:8]}")
                try:
                    await jobs.start()
                except BaseException:
                    await jobs.close()  # the next request starts afresh; no pool left behind
                    raise
                self._jobs = jobs
        return self._jobs

    async def close(self) -> None:
        """Buffered prediction rows reach PostgreSQL before the replica goes (a scale-down or
        redeploy loses none); pools close."""
        self.fleet.stop()
        if self._recorder is not None:
            try:
                await asyncio.wait_for(self._recorder.close(), 10)
            except Exception as exc:
                log.warning("prediction rows not flushed at shutdown: %s", exc)
        if self._jobs is not None:
            await self._jobs.close()
