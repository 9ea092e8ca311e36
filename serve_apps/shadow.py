"""The mirror of a shadow or canary rollout: after a request is answered, its rows are scored by
the rollout's other version (the challenger for what the champion answered, the champion for what
a canary's challenger answered) and recorded as `shadow_predictions`, which the rollout service
pairs with the served rows.

Nothing here is on the client's path: a mirror is queued after the answer is computed, the
queue holds at most ROLLOUT_SHADOW_QUEUE_REQUESTS requests per replica (a mirror that finds it
full is dropped and counted, never waited for), and one worker scores what has queued up.

The worker lets a batch gather for a moment before it scores, since most of a model call's cost
is fixed. It scores on the replica's event loop, in model calls of at most
ROLLOUT_SHADOW_BATCH_ROWS rows, and lets the requests waiting in between each: a thread of its own
would contend with the event loop for the interpreter lock, and the contention cost the clients
more than the scoring itself (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from serve_apps.champion import LoadedModel, to_predictions
from serve_apps.metrics import RolloutMetrics
from services.feedback.store import ShadowRow

log = logging.getLogger("ray.serve")

# A challenger that fails on every mirror is logged this often at most, per version.
FAILURE_LOG_INTERVAL_S = 60.0
# How long the worker waits for a batch to fill once a mirror arrived: single-row mirrors scored one
# by one would cost a model call each, where a gathered batch costs little more than one row. It
# stops waiting as soon as a batch's worth of rows, or half the queue's bound, has arrived.
GATHER_S = 0.2


@dataclass(frozen=True, slots=True)
class Mirror:
    """A served request's rows, for `model` (the version that did not answer) to score."""

    rollout_id: int
    model: LoadedModel
    request_id: str
    rows: list[dict[str, Any]]


def shadow_rows(model: LoadedModel, mirrors: list[Mirror], predictions: list[dict[str, Any]]) -> list[ShadowRow]:
    """The rows to record: `model`'s answers (in the mirrors' row order) to each mirrored request."""
    scored: list[ShadowRow] = []
    position = 0
    for mirror in mirrors:
        for index in range(len(mirror.rows)):
            p = predictions[position]
            position += 1
            scored.append(
                ShadowRow(
                    mirror.request_id,
                    index,
                    model.name,
                    model.version,
                    p.get("label"),
                    p.get("probability"),
                    {"probabilities": p["probabilities"]} if "probabilities" in p else {"value": p.get("value")},
                    mirror.rollout_id,
                )
            )
    return scored


class ShadowScorer:
    """The replica's bounded mirror queue and the worker that empties it."""

    def __init__(
        self,
        max_requests: int,
        batch_rows: int,
        record: Callable[[list[ShadowRow]], None],
        metrics: RolloutMetrics,
    ) -> None:
        self.max_requests = max_requests
        self.batch_rows = batch_rows
        self._record = record
        self._metrics = metrics
        self._queue: deque[Mirror] = deque()
        self._rows = 0  # queued rows
        self._wake = asyncio.Event()
        self._full = asyncio.Event()  # a batch's worth of rows, or half the bound, is queued
        self._task: asyncio.Task[None] | None = None
        # Taken from the queue and not yet scored: dropped (and counted) if the worker stops.
        self._unscored: list[Mirror] = []
        self._failures_logged: dict[tuple[str, str], float] = {}

    @property
    def queued(self) -> int:
        return len(self._queue)

    def offer(self, mirror: Mirror) -> bool:
        """Queue a mirror unless the queue is full (then it is dropped and counted); never waits."""
        if len(self._queue) >= self.max_requests:
            self._metrics.count_shadow(mirror.model.name, "dropped")
            return False
        self._queue.append(mirror)
        self._rows += len(mirror.rows)
        self._wake.set()
        if self._rows >= self.batch_rows or 2 * len(self._queue) >= self.max_requests:
            self._full.set()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    def _take(self) -> list[Mirror]:
        """What has queued up, oldest first, up to one model call's rows (at least one request)."""
        taken = [self._queue.popleft()]
        rows = len(taken[0].rows)
        while self._queue and rows + len(self._queue[0].rows) <= self.batch_rows:
            mirror = self._queue.popleft()
            rows += len(mirror.rows)
            taken.append(mirror)
        self._rows -= rows
        if self._rows < self.batch_rows and 2 * len(self._queue) < self.max_requests:
            self._full.clear()
        return taken

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._full.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), GATHER_S)
            while self._queue:
                await self.score_batch(self._take())

    async def score_batch(self, mirrors: list[Mirror]) -> None:
        """Score one batch, one model call per version in it (a canary mirrors to both)."""
        groups: dict[int, list[Mirror]] = {}
        for mirror in mirrors:
            groups.setdefault(id(mirror.model), []).append(mirror)
        self._unscored = list(mirrors)
        for group in groups.values():
            model = group[0].model
            try:
                predictions = await self._predict(model, [row for mirror in group for row in mirror.rows])
            except Exception as exc:
                self._metrics.count_shadow(model.name, "failed", len(group))
                self._log_failure(model, exc)
            else:
                self._record(shadow_rows(model, group, predictions))
                self._metrics.count_shadow(model.name, "scored", len(group))
            self._unscored = [mirror for mirror in self._unscored if mirror.model is not model]

    async def _predict(self, model: LoadedModel, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`model`'s answers in calls of `batch_rows` rows at most, each after the requests that
        arrived meanwhile have had their turn: the client's answer never waits for more than one."""
        schema = model.predictor.schema
        predictions: list[dict[str, Any]] = []
        for start in range(0, len(rows), self.batch_rows):
            await asyncio.sleep(0)
            outputs = model.predictor.record_outputs(rows[start : start + self.batch_rows])
            predictions.extend(to_predictions(outputs, schema.task, schema.classes))
        return predictions

    def _log_failure(self, model: LoadedModel, exc: Exception) -> None:
        key = (model.name, model.version)
        now = time.monotonic()
        if now - self._failures_logged.get(key, -FAILURE_LOG_INTERVAL_S) >= FAILURE_LOG_INTERVAL_S:
            self._failures_logged[key] = now
            log.warning(
                "mirrored rows not scored by %s version %s: %s: %s",
                model.name,
                model.version,
                type(exc).__name__,
                exc,
                extra={"model_version": model.version},
            )

    async def close(self) -> None:
        """Stop the worker; mirrors not scored yet are dropped (and counted), the rows already
        scored were recorded and leave with the recorder's last flush."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for mirror in [*self._unscored, *self._queue]:
            self._metrics.count_shadow(mirror.model.name, "dropped")
        self._unscored = []
        self._queue.clear()
        self._rows = 0
