"""The champion model inside the ingress replica: follows the registry alias, hot-swaps versions,
predicts joined batches; during a shadow or canary rollout it holds the challenger too
(serve_apps/rollout.py loads it and routes to it).

It lives in the replica that parses the request rather than in a deployment of its own: a Ray
actor call per request cost more than the model itself (see benchmarks/README.md), and scaling
the ingress scales the model with it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from mlflow.tracking import MlflowClient

from jobs.compatibility import CONTRACT_TAG, contract_changes, operator_approval
from jobs.predictor import TabularPredictor
from jobs.preprocess import Encoded, _transform
from jobs.registry import champion_version, load_predictor
from jobs.rollout import RESTORED_FROM_TAG
from serve_apps.metrics import ModelMetrics
from serve_apps.validation import FeatureBatch, RowValidator, feature_pieces, join_batches
from services.feedback.store import copy_text
from services.rollout.models import RolloutKind

log = logging.getLogger("ray.serve")

# One request's rows: validated columns (`FeatureBatch`), or objects of feature values.
Rows = FeatureBatch | list[dict[str, Any]]


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

    @functools.cached_property
    def encoder(self) -> ColumnEncoder:
        return ColumnEncoder(self.predictor)

    @functools.cached_property
    def answers(self) -> PredictionsJson:
        schema = self.predictor.schema
        return PredictionsJson(schema.task, schema.classes)

    def outputs(self, batch: FeatureBatch) -> np.ndarray:
        """The model's outputs for a batch coded as this version codes it."""
        return self.predictor._outputs(self.encoder.encode(batch))


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
    # Class probabilities (rows, classes) or values (rows,).
    outputs: np.ndarray

    @property
    def predictions(self) -> list[dict[str, Any]]:
        """The API's prediction objects (built on demand: the response is encoded from `outputs`)."""
        schema = self.model.predictor.schema
        return to_predictions(self.outputs, schema.task, schema.classes)

    @functools.cached_property
    def numbers(self) -> AnswerNumbers:
        return AnswerNumbers.of(self.outputs, self.model.predictor.schema.task)

    def predictions_json(self) -> bytes:
        """The JSON array of `predictions`, byte for byte as orjson writes it, without them."""
        return self.model.answers.encode(self.outputs, self.numbers)


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


def _json_floats(values: np.ndarray) -> list[bytes]:
    """Each float as orjson writes a Python float (the same shortest form), from one call."""
    if not len(values):
        return []
    encoded: bytes = orjson.dumps(np.ascontiguousarray(values, dtype=np.float64), option=orjson.OPT_SERIALIZE_NUMPY)
    return encoded[1:-1].split(b",")


@dataclass(frozen=True, slots=True)
class AnswerNumbers:
    """The numbers of a request's answer, each as the JSON orjson writes for it, encoded once for
    the response and for the record: the top class of each row and its probability, and every
    class's probability row after row (classification), or the value of each row (regression)."""

    rows: int
    top: list[bytes]
    best: np.ndarray | None = None
    each: list[bytes] | None = None

    @classmethod
    def of(cls, outputs: np.ndarray, task: str) -> AnswerNumbers:
        if task == "regression":
            return cls(len(outputs), _json_floats(outputs))
        probabilities = np.asarray(outputs, dtype=np.float64)
        best = probabilities.argmax(axis=1)
        top = _json_floats(probabilities[np.arange(len(probabilities)), best])
        return cls(len(outputs), top, best, _json_floats(probabilities.ravel()))

    def skipping(self, rows: int) -> AnswerNumbers:
        """The numbers without the first `rows` rows."""
        if rows == 0:
            return self
        classes = len(self.each) // self.rows if self.each is not None and self.rows else 0
        best = None if self.best is None else self.best[rows:]
        each = None if self.each is None else self.each[rows * classes :]
        return AnswerNumbers(self.rows - rows, self.top[rows:], best, each)


class PredictionsJson:
    """The JSON array `orjson.dumps(to_predictions(outputs, task, classes))` gives, built from the
    outputs without a Python object per row: every number is encoded in one orjson call per column,
    the constant parts once per model, and each row's pieces are laid side by side in a numpy object
    array and joined at once (a row-by-row dict cost more than the model on 1,000-row requests)."""

    def __init__(self, task: str, classes: list[str] | None) -> None:
        self.task = task
        self.classes = classes or []
        names = [orjson.dumps(name) for name in self.classes]
        self._label_prefix = np.empty(len(names), dtype=object)
        self._label_prefix[:] = [b'{"label":' + name + b',"probability":' for name in names]
        # Between the numbers: the top class's probability, then each class's.
        self._keys = [(b',"probabilities":{' if j == 0 else b",") + name + b":" for j, name in enumerate(names)]

    def encode(self, outputs: np.ndarray, numbers: AnswerNumbers | None = None) -> bytes:
        numbers = numbers or AnswerNumbers.of(outputs, self.task)
        rows = numbers.rows
        if rows == 0:
            return b"[]"
        if numbers.best is None or numbers.each is None:
            pieces = np.empty((rows, 3), dtype=object)
            pieces[:, 0] = b'{"value":'
            pieces[:, 1] = numbers.top
            pieces[:, 2] = b"},"
        else:
            classes = len(self.classes)
            pieces = np.empty((rows, 3 + 2 * classes), dtype=object)
            pieces[:, 0] = self._label_prefix[numbers.best]
            pieces[:, 1] = numbers.top
            for j, key in enumerate(self._keys):
                pieces[:, 2 + 2 * j] = key
                pieces[:, 3 + 2 * j] = numbers.each[j::classes]
            pieces[:, -1] = b"}},"
        pieces[-1, -1] = pieces[-1, -1][:-1]  # no comma after the last row
        return b"[" + b"".join(pieces.ravel().tolist()) + b"]"


# Row indexes as COPY fields, made once: a request has at most MAX_BATCH_ROWS rows.
_ROW_INDEXES: list[bytes] = []


def _row_indexes(start: int, stop: int) -> list[bytes]:
    while len(_ROW_INDEXES) < stop:
        _ROW_INDEXES.extend(b"%d\t" % i for i in range(len(_ROW_INDEXES), max(stop, 2 * len(_ROW_INDEXES))))
    return _ROW_INDEXES[start:stop]


class RecordLines:
    """A request's predictions as the lines the recorder COPYs into `predictions`
    (services/feedback/store.py's PREDICTION_COPY_COLUMNS), built when it flushes rather than on
    the request path, from what the request already holds: the validated columns and the answer's
    numbers. Each row's pieces (request id, index, label, probability, the output and the features
    as JSON) are laid side by side in a numpy object array and joined at once, with no object per
    row; the JSON is what the answer carried and what `instances` would have sent."""

    __slots__ = ("_batch", "_model", "_numbers", "_request_id")

    def __init__(self, request_id: str, model: LoadedModel, numbers: AnswerNumbers, batch: FeatureBatch) -> None:
        self._request_id = request_id
        self._model = model
        self._numbers = numbers
        self._batch = batch

    def __call__(self, skip: int) -> bytes:
        model, numbers = self._model, self._numbers.skipping(skip)
        rows = numbers.rows
        if rows == 0:
            return b""
        features = feature_pieces(self._batch, copy_text=True)[skip:]
        features[:, -1] = b"}\n"
        head = [copy_text(self._request_id) + b"\t", _row_indexes(skip, skip + rows)]
        meta = copy_text(model.name) + b"\t" + copy_text(model.version) + b"\t"
        if numbers.best is None or numbers.each is None:
            answer = [meta + b'\\N\t\\N\t{"value":', numbers.top, b"}\t"]
        else:
            classes = model.predictor.schema.classes or []
            labels = np.empty(len(classes), dtype=object)
            labels[:] = [meta + copy_text(name) + b"\t" for name in classes]
            # A probability the answer has as null (a NaN output) is a null field.
            top = (
                [b"\\N" if value == b"null" else value for value in numbers.top]
                if b"null" in numbers.top
                else numbers.top
            )
            answer = [labels[numbers.best], top]
            for j, name in enumerate(classes):
                key = (b'\t{"probabilities":{' if j == 0 else b",") + orjson.dumps(name).replace(b"\\", b"\\\\") + b":"
                answer += [key, numbers.each[j :: len(classes)]]
            answer.append(b"}}\t")
        pieces = np.empty((rows, len(head) + len(answer) + features.shape[1]), dtype=object)
        for j, column in enumerate([*head, *answer]):
            pieces[:, j] = column
        pieces[:, len(head) + len(answer) :] = features
        return b"".join(pieces.ravel().tolist())


class ColumnEncoder:
    """The model's input arrays for a `FeatureBatch`: what `Preprocessor.encode_records` gives for
    the same rows (tested), from the validated columns instead of a look-up per row and value."""

    def __init__(self, predictor: TabularPredictor) -> None:
        preprocessor = predictor.preprocessor
        schema = preprocessor.schema
        state = preprocessor.state
        self._categorical = [f.name for f in schema.categorical]
        self._bucketed = [(f.name, np.asarray(state.bucket_edges[f.name])) for f in schema.bucketed]
        # The numeric inputs as one matrix: a few whole-matrix passes instead of several per
        # feature, which is most of the cost of a request of a few rows.
        numeric = [f.name for f in schema.numeric]
        self._raw = numeric + [name for name, _ in self._bucketed if name not in numeric]
        self._n_numeric = len(numeric)
        self._bucketed_at = [self._raw.index(name) for name, _ in self._bucketed]
        self._transforms: dict[str, list[int]] = {}
        for j, f in enumerate(schema.numeric):
            if f.transform != "none":
                self._transforms.setdefault(f.transform, []).append(j)
        self._mean = np.array([state.numeric_stats[name].mean for name in numeric], dtype=np.float64)
        self._std = np.array([state.numeric_stats[name].std for name in numeric], dtype=np.float64)

    def encode(self, batch: FeatureBatch) -> Encoded:
        rows = batch.size
        raw = np.empty((rows, len(self._raw)), dtype=np.float64)
        for j, name in enumerate(self._raw):
            raw[:, j] = batch.numeric[name]
        n_cat = len(self._categorical)
        x_cat = np.empty((rows, n_cat + len(self._bucketed)), dtype=np.int64)
        for j, name in enumerate(self._categorical):
            x_cat[:, j] = batch.codes[name]
        for j, (name, edges) in enumerate(self._bucketed):
            x_cat[:, n_cat + j] = np.searchsorted(edges, batch.numeric[name], side="right") + 1
        if self._bucketed:
            bucketed = x_cat[:, n_cat:]  # a view: missing values get the reserved code 0 in place
            bucketed[np.isnan(raw[:, self._bucketed_at])] = 0
        values = raw[:, : self._n_numeric]  # the numeric features' columns, transformed in place
        for transform, at in self._transforms.items():
            # The preprocessing's own transform, element for element: the two paths cannot drift apart.
            values[:, at] = _transform(values[:, at], transform)
        values -= self._mean
        values /= self._std
        x_num = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        return Encoded(x_cat=x_cat, x_num=x_num)


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

    def predict(self, requests: Sequence[Rows], model: LoadedModel | None = None) -> list[BatchResult]:
        """One model call for the rows of every request in the batch (already validated): with
        `model` (the champion or the challenger a request was routed to), else the loaded champion."""
        model = model or self.loaded
        assert model is not None  # callers checked; the reference is only ever replaced
        outputs = _outputs(model, requests)
        self._count(model, outputs, model.predictor.schema.classes)
        results: list[BatchResult] = []
        start = 0
        for request in requests:
            results.append(BatchResult(model, outputs[start : start + len(request)]))
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


def _outputs(model: LoadedModel, requests: Sequence[Rows]) -> np.ndarray:
    """Validated batches coded as `model` codes them go through the columns; anything else (rows
    as objects, or a batch coded by a version with other categories) through the rows."""
    batches = [r for r in requests if isinstance(r, FeatureBatch) and model.validator.codes_like(r.validator)]
    if len(batches) == len(requests):
        return model.outputs(join_batches(batches))
    rows = [
        row
        for request in requests
        for row in (request.validator.rows_of(request) if isinstance(request, FeatureBatch) else request)
    ]
    return model.predictor.record_outputs(rows)
