"""The champion model inside the ingress replica: follows the registry alias, hot-swaps versions,
predicts joined batches.

It lives in the replica that parses the request rather than in a deployment of its own: a Ray
actor call per request cost more than the model itself (see benchmarks/README.md), and scaling
the ingress scales the model with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor
from serve_apps.metrics import ModelMetrics
from serve_apps.validation import RowValidator

log = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class LoadedModel:
    name: str
    version: str
    run_id: str
    predictor: TabularPredictor
    validator: RowValidator
    loaded_at: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ref(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "run_id": self.run_id}


@dataclass(frozen=True)
class BatchResult:
    """One request's share of a joined batch, with the model that computed it: a swap between
    two batches never mixes versions inside one response."""

    model: LoadedModel
    predictions: list[dict[str, Any]]


def to_predictions(outputs: np.ndarray, task: str, classes: list[str] | None) -> list[dict[str, Any]]:
    """The API's prediction objects from the model's outputs: probabilities (rows, classes) for
    classification, values (rows,) for regression."""
    if task == "regression":
        return [{"value": v} for v in outputs.astype(np.float64).tolist()]
    names = classes or []
    best = outputs.argmax(axis=1).tolist()
    # tolist() turns whole arrays into Python floats at once instead of one float() per cell.
    probabilities = outputs.astype(np.float64).tolist()
    if len(names) == 2:  # binary: a dict literal per row, a third of the time of dict(zip())
        first, second = names
        return [
            {"label": names[k], "probability": p[k], "probabilities": {first: p[0], second: p[1]}}
            for k, p in zip(best, probabilities, strict=True)
        ]
    return [
        {"label": names[k], "probability": p[k], "probabilities": dict(zip(names, p, strict=True))}
        for k, p in zip(best, probabilities, strict=True)
    ]


def fetch(client: MlflowClient, model_name: str, alias: str, current: str | None) -> LoadedModel | None:
    """Blocking registry look-up and download; returns a model only when the alias moved."""
    mv = champion_version(client, model_name, alias)
    if mv is None or mv.version == current:
        return None
    predictor = load_predictor(f"models:/{model_name}/{mv.version}")
    metrics: dict[str, float] = {}
    if mv.run_id:
        run = client.get_run(mv.run_id)
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return LoadedModel(
        name=model_name,
        version=str(mv.version),
        run_id=mv.run_id or "",
        predictor=predictor,
        validator=RowValidator(predictor.schema),
        loaded_at=time.time(),
        metrics=metrics,
    )


class ChampionModel:
    """The model version the alias names, reloaded when the alias moves; the old version keeps
    answering until the new one is loaded, and whatever the registry does."""

    def __init__(self, model_name: str, alias: str, tracking_uri: str, poll_interval_s: float) -> None:
        self.model_name = model_name
        self.alias = alias
        mlflow.set_tracking_uri(tracking_uri)  # model downloads resolve models:/ URIs through it
        self._registry = MlflowClient(tracking_uri)
        self._poll_interval_s = poll_interval_s
        self._metrics = ModelMetrics()
        self.loaded: LoadedModel | None = None
        self.last_error: str | None = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow_alias())

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

    async def refresh(self) -> str | None:
        """Load the aliased version if it changed; requests keep using the old one until then."""
        current = self.loaded.version if self.loaded else None
        try:
            loaded = await asyncio.to_thread(fetch, self._registry, self.model_name, self.alias, current)
        except Exception as exc:  # keep serving the loaded version whatever the registry does
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("model refresh failed: %s", self.last_error)
            self._report_serving()
            return current
        self.last_error = None
        if loaded is not None:
            # A single reference assignment: a batch in flight keeps the model it started with.
            self.loaded = loaded
        self._report_serving()
        if loaded is not None:
            log.info(
                "serving %s version %s (was %s)",
                self.model_name,
                loaded.version,
                current,
                extra={"model_version": loaded.version, "run_id": loaded.run_id},
            )
        return self.loaded.version if self.loaded else None

    def _report_serving(self) -> None:
        """Set on every poll, not only on a swap: Ray's metrics agent drops a gauge that has not been
        reported for two export intervals."""
        if self.loaded is not None and self.loaded.version.isdigit():
            self._metrics.serving_version.set(int(self.loaded.version), tags={"model": self.model_name})

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self.refresh()

    def status(self) -> dict[str, Any]:
        model = self.loaded
        return {
            "ready": model is not None,
            "model": model.ref if model else None,
            "alias": self.alias,
            "last_error": self.last_error,
        }

    def current(self) -> dict[str, Any] | None:
        model = self.loaded
        if model is None:
            return None
        schema = model.predictor.schema
        return {
            **model.ref,
            "alias": self.alias,
            "loaded_at": model.loaded_at,
            "task": schema.task,
            "target": schema.target,
            "classes": schema.classes,
            "features": [f.model_dump(exclude={"transform", "buckets"}) for f in schema.features],
            "metrics": model.metrics,
        }

    def predict(self, requests: list[list[dict[str, Any]]]) -> list[BatchResult]:
        """One model call for the rows of every request in the batch (already validated)."""
        model = self.loaded
        assert model is not None  # callers checked; the reference is only ever replaced
        schema = model.predictor.schema
        rows = [row for request in requests for row in request]
        outputs = model.predictor.record_outputs(rows)
        predictions = to_predictions(outputs, schema.task, schema.classes)
        self._count(model, outputs, schema.classes)
        results: list[BatchResult] = []
        start = 0
        for request in requests:
            results.append(BatchResult(model, predictions[start : start + len(request)]))
            start += len(request)
        return results

    def _count(self, model: LoadedModel, outputs: np.ndarray, classes: list[str] | None) -> None:
        self._metrics.batch_rows.observe(len(outputs))
        if outputs.ndim != 2 or not classes:
            return
        counts = np.bincount(outputs.argmax(axis=1), minlength=len(classes))
        for label, count in zip(classes, counts.tolist(), strict=True):
            if count:
                self._metrics.predictions.inc(
                    count, tags={"model": model.name, "model_version": model.version, "label": label}
                )
