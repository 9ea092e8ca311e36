"""What one ingress replica holds for its routes: the settings it was started with, the models it
serves and their batching, the prediction recorder, the rollouts it follows and their mirror
queue, and the training-job service. The deployment (serve_apps/ingress.py) builds it once;
routes reach it through a FastAPI dependency."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
from pydantic import BaseModel, ConfigDict, Field

from core.database import TRANSIENT_DB_ERRORS
from core.settings import Settings
from serve_apps.champion import BatchResult, ChampionModel, LoadedModel
from serve_apps.errors import FeedbackDisabledError, TrainingJobsDisabledError
from serve_apps.fleet import ModelFleet, Routed
from serve_apps.metrics import IngressMetrics, RolloutMetrics
from serve_apps.rollout import CanaryKey, RolloutFollower, canary_key
from serve_apps.shadow import Mirror, ShadowScorer
from services.feedback.recorder import PredictionRecorder
from services.feedback.store import FeedbackStore
from services.rollout.models import RolloutOverview
from services.rollout.store import RolloutStore
from services.training_jobs.service import TrainingJobs

log = logging.getLogger("ray.serve")

# GET /v1/models/{name} shows the model without its rollout when the records cannot be read: the
# server away, too slow, or the tables not there yet.
_OVERVIEW_UNAVAILABLE: tuple[type[Exception], ...] = (*TRANSIENT_DB_ERRORS, TimeoutError, psycopg.Error)


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
    # One request's rows for one model version, joined with other requests' by @serve.batch.
    predict_batch: Callable[[Routed], Awaitable[BatchResult]]
    max_rows: int
    rollout_metrics: RolloutMetrics = field(default_factory=RolloutMetrics)
    _recorder: PredictionRecorder | None = None
    _rollouts: RolloutFollower | None = None
    _shadow: ShadowScorer | None = None
    _jobs: TrainingJobs | None = None
    _jobs_lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def champion(self) -> ChampionModel:
        """The default model (`MODEL_NAME`): what /v1/predict and /v1/models/current answer with."""
        return self.fleet.default

    def __post_init__(self) -> None:
        # Read once: the request path only calls it, during a canary.
        self.canary_key: CanaryKey = canary_key(self.settings.rollout.canary_key)

    def start_rollouts(self) -> None:
        """Follow the rollout service's records (nothing to follow without a database, or with
        ROLLOUT_ENABLED=false); connects in the background."""
        database = self.settings.database.value()
        if database is None or not self.settings.rollout.enabled or self._rollouts is not None:
            return
        self._rollouts = RolloutFollower(RolloutStore(database), self.fleet, self.rollout_metrics)
        self._rollouts.start()

    def mirror(self, rollout_id: int, model: LoadedModel, request_id: str, rows: list[dict[str, Any]]) -> None:
        """Queue a served request for `model`, the rollout's other version, to score; never waits."""
        scorer = self._shadow
        if scorer is None:
            recorder = self.prediction_recorder()
            if recorder is None:
                return
            rollout = self.settings.rollout
            scorer = self._shadow = ShadowScorer(
                rollout.shadow_queue_requests, rollout.shadow_batch_rows, recorder.record_shadow, self.rollout_metrics
            )
        scorer.offer(Mirror(rollout_id, model, request_id, rows))

    async def rollout_overview(self, model_name: str) -> tuple[RolloutOverview | None, str | None]:
        """The rollout records of a model for GET /v1/models/{name}, and why not when they could
        not be read in time (None, None: no rollout service to ask)."""
        if self._rollouts is None:
            return None, None
        try:
            return await self._rollouts.overview(model_name), None
        except _OVERVIEW_UNAVAILABLE as exc:
            log.warning("rollout records of %s not readable: %s: %s", model_name, type(exc).__name__, exc)
            return None, f"the rollout records (PostgreSQL) could not be read: {type(exc).__name__}"

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
        if self._rollouts is not None:
            await self._rollouts.stop()
        if self._shadow is not None:
            await self._shadow.close()
        # Counts gathered since the last poll (the follower reports them otherwise).
        self.rollout_metrics.report()
        if self._recorder is not None:
            try:
                await asyncio.wait_for(self._recorder.close(), 10)
            except Exception as exc:
                log.warning("prediction rows not flushed at shutdown: %s", exc)
        if self._jobs is not None:
            await self._jobs.close()
