"""The champion model inside the ingress replica: follows the registry alias, hot-swaps versions,
predicts joined batches; during a shadow or canary rollout it holds the challenger too
(serve_apps/rollout.py loads it and routes to it).

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

import numpy as np
from mlflow.tracking import MlflowClient

from jobs.compatibility import CONTRACT_TAG, contract_changes, operator_approval
from jobs.predictor import TabularPredictor
from jobs.registry import champion_version, load_predictor
from jobs.rollout import RESTORED_FROM_TAG
from serve_apps.metrics import ModelMetrics
from serve_apps.validation import RowValidator
from services.rollout.models import RolloutKind

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


@dataclass(frozen=True, slots=True)
class ServingRollout:
    """A shadow or canary rollout as this replica follows it for one model, with the challenger
    loaded: replaced whole (one reference) whenever the rollout service's record changes."""

    id: int
    kind: RolloutKind
    # The champion the rollout compares with: a replica still serving another version neither
    # routes to the challenger nor mirrors, so every paired row compares these two versions.
    champion_version: str
    share: float  # of the traffic the challenger answers (canary); shadow: 0
    challenger: LoadedModel


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


@dataclass(frozen=True)
class RefusedSwap:
    """The alias names a version this replica will not serve: it breaks the serving contract of the
    version in force, and no operator approved that."""

    version: str
    reason: str
    since: float


@dataclass(frozen=True)
class Poll:
    """What one look at the alias found: a version to swap in, and/or a version refused."""

    model: LoadedModel | None = None
    refused: RefusedSwap | None = None


def load_version(client: MlflowClient, model_name: str, version: str, run_id: str | None) -> LoadedModel:
    """Blocking download of one version, with its test metrics."""
    predictor = load_predictor(f"models:/{model_name}/{version}", client.tracking_uri)
    metrics: dict[str, float] = {}
    if run_id:
        run = client.get_run(run_id)
        metrics = {k: v for k, v in run.data.metrics.items() if k.startswith("test_")}
    return LoadedModel(
        name=model_name,
        version=str(version),
        run_id=run_id or "",
        predictor=predictor,
        validator=RowValidator(predictor.schema),
        loaded_at=time.time(),
        metrics=metrics,
    )


def _contract_in_force(client: MlflowClient, model_name: str, aliased: str) -> LoadedModel | None:
    """On a cold start: the version whose contract the gate last put in force, when the alias has
    since moved elsewhere by hand (None when they agree or the model predates the record)."""
    recorded = client.get_registered_model(model_name).tags.get(CONTRACT_TAG)
    if not recorded or recorded == aliased:
        return None
    mv = client.get_model_version(model_name, recorded)
    return load_version(client, model_name, recorded, mv.run_id)


def poll_alias(
    client: MlflowClient,
    model_name: str,
    alias: str,
    current: LoadedModel | None,
    refused: RefusedSwap | None,
    preloaded: LoadedModel | None = None,
) -> Poll:
    """Blocking registry look-up; downloads a version only when the alias moved to one not yet
    refused and not `preloaded` (a promoted challenger is already in memory)."""
    mv = champion_version(client, model_name, alias)
    version = None if mv is None else str(mv.version)  # an int from some registry stores
    if mv is None or version is None or (current is not None and version == current.version):
        return Poll()
    # A rollback restores the contract clients had before the version being served: it may be
    # narrower than the one it replaces, and was in force until the promotion it undoes.
    restored = current is not None and (mv.tags or {}).get(RESTORED_FROM_TAG) == current.version
    approved = operator_approval(mv.tags or {}) or restored
    if refused is not None and refused.version == version and not approved:
        return Poll(refused=refused)
    if preloaded is not None and preloaded.version == version:
        candidate = preloaded
    else:
        candidate = load_version(client, model_name, version, mv.run_id)
    in_force = current or (None if approved else _contract_in_force(client, model_name, version))
    if in_force is None or approved:
        return Poll(model=candidate)
    changes = contract_changes(in_force.predictor.schema, candidate.predictor.schema)
    if not changes:
        return Poll(model=candidate)
    reason = f"breaks the contract of version {in_force.version}: {'; '.join(changes)}"
    return Poll(model=None if current else in_force, refused=RefusedSwap(version, reason, time.time()))


class ChampionModel:
    """The model version the alias names, reloaded when the alias moves; the old version keeps
    answering until the new one is loaded, whatever the registry does, and goes on answering when
    the alias moves to a version that breaks its serving contract without an operator's approval."""

    def __init__(
        self,
        model_name: str,
        alias: str,
        tracking_uri: str,
        poll_interval_s: float,
        metrics: ModelMetrics | None = None,
    ) -> None:
        self.model_name = model_name
        self.alias = alias
        self.registry = MlflowClient(tracking_uri)
        self.poll_interval_s = poll_interval_s
        # One set per replica, shared by its models: each series carries the model's name.
        self._metrics = metrics or ModelMetrics()
        self.loaded: LoadedModel | None = None
        self.refused: RefusedSwap | None = None
        self.last_error: str | None = None
        # Set by the replica's RolloutFollower (serve_apps/rollout.py); None: no rollout to follow.
        self.rollout: ServingRollout | None = None
        self._follower: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow_alias())

    def stop(self) -> None:
        if self._follower is not None:
            self._follower.cancel()

    async def refresh(self) -> str | None:
        """Load the aliased version if it changed; requests keep using the old one until then."""
        current = self.loaded
        rollout = self.rollout
        try:
            poll = await asyncio.to_thread(
                poll_alias,
                self.registry,
                self.model_name,
                self.alias,
                current,
                self.refused,
                rollout.challenger if rollout is not None else None,
            )
        except Exception as exc:  # keep serving the loaded version whatever the registry does
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("model refresh failed: %s", self.last_error)
            self._report_serving()
            return current.version if current else None
        self.last_error = None
        if poll.refused is not None and poll.refused != self.refused:
            self._refusing(poll.refused)
        self.refused = poll.refused
        if poll.model is not None:
            # A single reference assignment: a batch in flight keeps the model it started with.
            self.loaded = poll.model
            log.info(
                "serving %s version %s (was %s)",
                self.model_name,
                poll.model.version,
                current.version if current else None,
                extra={"model_version": poll.model.version, "run_id": poll.model.run_id},
            )
        self._report_serving()
        return self.loaded.version if self.loaded else None

    def _refusing(self, refused: RefusedSwap) -> None:
        self._metrics.swaps_refused.inc(tags={"model": self.model_name})
        log.error(
            "refusing to serve %s version %s named by alias %r: it %s; no operator approved the change "
            "(python -m jobs.promote --model %s --version %s --force --reason TEXT)",
            self.model_name,
            refused.version,
            self.alias,
            refused.reason,
            self.model_name,
            refused.version,
            extra={"model_version": refused.version},
        )

    def _report_serving(self) -> None:
        """Set on every poll, not only on a swap: Ray's metrics agent drops a gauge that has not been
        reported for two export intervals."""
        tags = {"model": self.model_name}
        if self.loaded is not None and self.loaded.version.isdigit():
            self._metrics.serving_version.set(int(self.loaded.version), tags=tags)
        refused = self.refused.version if self.refused else "0"
        self._metrics.swap_refused_version.set(int(refused) if refused.isdigit() else -1, tags=tags)

    async def _follow_alias(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            await self.refresh()

    def _refused_view(self) -> dict[str, Any] | None:
        refused = self.refused
        return (
            None if refused is None else {"version": refused.version, "reason": refused.reason, "since": refused.since}
        )

    def status(self) -> dict[str, Any]:
        model = self.loaded
        return {
            "ready": model is not None,
            "model": model.ref if model else None,
            "alias": self.alias,
            "last_error": self.last_error,
            "swap_refused": self._refused_view(),
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
            "swap_refused": self._refused_view(),
        }

    def predict(self, requests: list[list[dict[str, Any]]], model: LoadedModel | None = None) -> list[BatchResult]:
        """One model call for the rows of every request in the batch (already validated): with
        `model` (the champion or the challenger a request was routed to), else the loaded champion."""
        model = model or self.loaded
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
        self._metrics.batch_rows.observe(len(outputs), tags={"model": model.name})
        if outputs.ndim != 2 or not classes:
            return
        counts = np.bincount(outputs.argmax(axis=1), minlength=len(classes))
        for label, count in zip(classes, counts.tolist(), strict=True):
            if count:
                self._metrics.predictions.inc(
                    count, tags={"model": model.name, "model_version": model.version, "label": label}
                )
