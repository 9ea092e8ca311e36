"""The model deployment: follows the registry alias, hot-swaps versions, batches requests."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from opentelemetry import trace
from ray import serve

from cluster import tracecontext
from cluster.logs import add_context_filter, remember_trace
from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor
from serve_apps.context import serve_request_id
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


def _rows_to_predictions(result: pd.DataFrame, task: str, classes: list[str] | None) -> list[dict[str, Any]]:
    if task == "regression":
        return [{"value": float(v)} for v in result["value"].to_numpy()]
    probability_columns = [f"p_{c}" for c in classes or []]
    probabilities = result[probability_columns].to_numpy()
    labels = result["label"].to_numpy()
    best = result["probability"].to_numpy()
    return [
        {
            "label": str(labels[i]),
            "probability": float(best[i]),
            "probabilities": dict(zip(classes or [], map(float, probabilities[i]), strict=True)),
        }
        for i in range(len(result))
    ]


def _fetch(client: MlflowClient, model_name: str, alias: str, current: str | None) -> LoadedModel | None:
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


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
class ModelServer:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        model_name: str,
        alias: str,
        tracking_uri: str,
        poll_interval_s: float = 5.0,
        max_batch_size: int = 64,
        batch_wait_timeout_s: float = 0.005,
        torch_threads: int = 1,
    ) -> None:
        import torch

        torch.set_num_threads(torch_threads)
        add_context_filter("ray.serve", "model-server")
        self._metrics = ModelMetrics()
        self._model_name = model_name
        self._alias = alias
        mlflow.set_tracking_uri(tracking_uri)  # model downloads resolve models:/ URIs through it
        self._registry = MlflowClient(tracking_uri)
        self._poll_interval_s = poll_interval_s
        self._model: LoadedModel | None = None
        self._last_error: str | None = None
        self.predict_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self.predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]
        await self.refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow_alias())

    async def refresh(self) -> str | None:
        """Load the aliased version if it changed; requests keep using the old one until then."""
        current = self._model.version if self._model else None
        try:
            loaded = await asyncio.to_thread(_fetch, self._registry, self._model_name, self._alias, current)
        except Exception as exc:  # keep serving the loaded version whatever the registry does
            self._last_error = f"{type(exc).__name__}: {exc}"
            log.warning("model refresh failed: %s", self._last_error)
            self._report_serving()
            return current
        self._last_error = None
        if loaded is not None:
            # A single reference assignment: a batch in flight keeps the model it started with.
            self._model = loaded
        self._report_serving()
        if loaded is not None:
            log.info(
                "serving %s version %s (was %s)",
                self._model_name,
                loaded.version,
                current,
                extra={"model_version": loaded.version, "run_id": loaded.run_id},
            )
        return self._model.version if self._model else None

    def _report_serving(self) -> None:
        """Set on every poll, not only on a swap: Ray's metrics agent drops a gauge that has not been
        reported for two export intervals."""
        if self._model is not None and self._model.version.isdigit():
            self._metrics.serving_version.set(int(self._model.version), tags={"model": self._model_name})

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self._poll_interval_s)
            await self.refresh()

    def status(self) -> dict[str, Any]:
        model = self._model
        return {
            "ready": model is not None,
            "model": model.ref if model else None,
            "alias": self._alias,
            "last_error": self._last_error,
        }

    def current(self) -> dict[str, Any] | None:
        model = self._model
        if model is None:
            return None
        schema = model.predictor.schema
        return {
            **model.ref,
            "alias": self._alias,
            "loaded_at": model.loaded_at,
            "task": schema.task,
            "target": schema.target,
            "classes": schema.classes,
            "features": [f.model_dump(exclude={"transform", "buckets"}) for f in schema.features],
            "metrics": model.metrics,
        }

    async def predict(self, rows: list[Any], traceparent: str | None = None) -> dict[str, Any]:
        """Validate against the served schema, then join a batch. Errors come back as data so the
        ingress can answer with the right status code."""
        model = self._model
        if model is None:
            return {"status": 503, "message": f"no {self._alias} model is loaded yet"}
        trace.get_current_span().set_attribute("model.version", model.version)
        parsed = tracecontext.parse(traceparent)
        if parsed is not None:
            # Serve's access line for this call names only the request id: tie it to the trace.
            remember_trace(serve_request_id(), parsed[0], parsed[1])
        errors = model.validator.validate(rows)
        if errors:
            fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in errors[:5])
            return {"status": 422, "message": f"invalid instances: {fields}", "details": errors}
        return await self.predict_batch(rows)

    def _count(self, model: LoadedModel, result: pd.DataFrame, rows: int) -> None:
        self._metrics.batch_rows.observe(rows)
        if "label" not in result:
            return
        labels, counts = np.unique(result["label"].to_numpy().astype(str), return_counts=True)
        for label, count in zip(labels, counts, strict=True):
            self._metrics.predictions.inc(
                int(count), tags={"model": model.name, "model_version": model.version, "label": str(label)}
            )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def predict_batch(self, requests: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
        model = self._model
        assert model is not None  # predict() checked; the reference is only ever replaced
        schema = model.predictor.schema
        sizes = [len(rows) for rows in requests]
        frame = pd.DataFrame.from_records([row for rows in requests for row in rows], columns=schema.feature_names)
        result = model.predictor.predict_frame(frame)
        predictions = _rows_to_predictions(result, schema.task, schema.classes)
        self._count(model, result, len(frame))
        results: list[dict[str, Any]] = []
        start = 0
        for size in sizes:
            results.append({"status": 200, "model": model.ref, "predictions": predictions[start : start + size]})
            start += size
        return results
