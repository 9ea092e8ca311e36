"""The Serve deployment behind the inference API: one replica parses a request and runs the model,
batched across requests with `@serve.batch` (see the Serve config, serve_apps/config.yaml). Every
replica serves every model with a champion alias (serve_apps/fleet.py), loaded on first use."""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from ray import serve

from core.keys import KeyStore, bootstrap_principals, start_key_refresher
from core.logs import add_context_filter
from core.settings import get_settings
from serve_apps.api import create_api
from serve_apps.champion import BatchResult, ChampionModel
from serve_apps.fleet import ModelFleet, Routed, predict_by_model
from serve_apps.metrics import IngressMetrics, ModelMetrics
from serve_apps.replica import Replica, ServingKnobs
from serve_apps.serve_config import serving_knobs

# Serve's replica logger: its JSON handler writes the replica's log file.
log = logging.getLogger("ray.serve")
# Serve's throughput profile buffers the replica's log records (SERVE_ACCESS_LOG_BUFFER_LINES)
# and writes them only when the buffer is full: without this, a quiet replica's lines would wait
# for the fiftieth request. Flushing once a second bounds the delay and keeps the batching.
LOG_FLUSH_INTERVAL_S = 1.0


async def flush_serve_logs(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for handler in logging.getLogger("ray.serve").handlers:
            if isinstance(handler, logging.handlers.MemoryHandler):
                handler.flush()


@dataclass(frozen=True)
class ModelOptions:
    """Which registered model the replica serves: its identity, fixed for the replica's life (the
    knobs that may change while it runs are `ServingKnobs`)."""

    model_name: str
    alias: str
    tracking_uri: str
    torch_threads: int = 1


@serve.deployment
# Each replica builds its app in `__serve_build_asgi_app__`, once the constructor has made the state
# its routes read (an app passed here would be pickled with the class, and one with routers cannot be).
@serve.ingress()
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, model: ModelOptions, key_hashes: list[str], alert_token_hashes: list[str] | None = None
    ) -> None:
        import torch

        # One intra-op thread: the replica's event loop is the unit of parallelism, and more
        # threads than the replica's CPU share only contend (benchmarks/README.md).
        torch.set_num_threads(model.torch_threads)
        # The replica's process starts here: its settings are read once and handed down. Secrets
        # stay in the environment rather than in the deployment's arguments, which Serve stores.
        settings = get_settings()
        add_context_filter("ray.serve", "inference-api")
        # API_KEYS are admin keys; the key table adds keys with the scopes an operator gave them.
        bootstrap = bootstrap_principals(key_hashes)
        self._key_store = KeyStore(bootstrap)
        self._alert_token_store = (
            KeyStore(bootstrap_principals(alert_token_hashes, "ALERT_WEBHOOK_TOKEN", frozenset()))
            if alert_token_hashes
            else None
        )
        # Keys added or revoked with `python -m cluster keys` take effect without a restart.
        self._key_refresher = await start_key_refresher(
            self._key_store, bootstrap, settings.database.value(), settings.api.key_refresh_s
        )
        model_metrics = ModelMetrics()

        def champion_of(name: str) -> ChampionModel:
            return ChampionModel(
                name, model.alias, model.tracking_uri, self._replica.fleet.default.poll_interval_s, model_metrics
            )

        champion = ChampionModel(
            model.model_name, model.alias, model.tracking_uri, settings.model.poll_interval_s, model_metrics
        )
        fleet = ModelFleet(champion, champion_of, settings.model.max_served)
        self._replica = Replica(
            settings=settings,
            fleet=fleet,
            metrics=IngressMetrics(),
            predict_batch=self._predict_batch,
            max_rows=settings.max_batch_rows,
        )
        # What the settings say until Serve's user_config (rendered from the same settings) arrives.
        self.reconfigure(serving_knobs(settings.serve, settings.model, settings.max_batch_rows).model_dump())
        await champion.start()
        # After the champion: a challenger is checked against the contract of the one served.
        self._replica.start_rollouts()
        self._log_flusher = asyncio.get_running_loop().create_task(flush_serve_logs(LOG_FLUSH_INTERVAL_S))

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The app this replica serves, with the state its dependencies read (auth, the replica)."""
        app = create_api()
        app.state.key_store = self._key_store
        app.state.alert_token_store = self._alert_token_store
        app.state.replica = self._replica
        return app

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Serve calls this with the deployment's `user_config` at start and whenever it changes:
        batching, the alias poll and the row limit change without a replica restart."""
        knobs = ServingKnobs.model_validate(user_config)
        self._predict_batch.set_max_batch_size(knobs.max_batch_size)  # type: ignore[attr-defined]
        self._predict_batch.set_batch_wait_timeout_s(knobs.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._replica.fleet.set_poll_interval(knobs.poll_interval_s)
        self._replica.max_rows = knobs.max_rows
        log.info("serving knobs: %s", knobs.model_dump())

    @serve.batch
    async def _predict_batch(self, requests: list[Routed]) -> list[BatchResult]:
        # Runs on the replica's event loop: the model call for a batch of single rows is cheaper
        # than a hand-off to a thread would be.
        return predict_by_model(requests)

    async def __del__(self) -> None:
        """Serve's graceful shutdown: nothing accepted is lost (see Replica.close)."""
        self._log_flusher.cancel()
        if self._key_refresher is not None:
            await self._key_refresher.stop()
        await self._replica.close()
