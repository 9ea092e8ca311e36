"""Writes served predictions to PostgreSQL in batches, off the request path.

A prediction's response never waits on the database: rows are buffered and flushed every
`PREDICTION_FLUSH_INTERVAL_S`. While PostgreSQL is away the buffer holds up to
`PREDICTION_BUFFER_ROWS` rows and then drops the oldest (counted), so an outage costs feedback
on those rows, never a prediction.

The rows a rollout's other version scored for the same requests (serve_apps/shadow.py) wait in a
buffer of their own, with the same bound, and go out with the same flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from core.database import TRANSIENT_DB_ERRORS
from services.feedback.store import FeedbackStore, PredictionRow, ShadowRow

Row = TypeVar("Row", PredictionRow, ShadowRow)

log = logging.getLogger("ray.serve")


class PredictionRecorder:
    def __init__(
        self,
        store: FeedbackStore,
        flush_interval_s: float,
        max_rows: int,
        on_dropped: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.store = store
        self._interval = flush_interval_s
        self._max_rows = max_rows
        self._buffer: deque[PredictionRow] = deque()
        self._shadow: deque[ShadowRow] = deque()
        self._on_dropped = on_dropped
        self._flush_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, rows: list[PredictionRow]) -> None:
        self._buffer.extend(rows)
        self._trim(self._buffer)

    def record_shadow(self, rows: list[ShadowRow]) -> None:
        """Rows a rollout's other version scored for served requests (never shown to a client)."""
        self._shadow.extend(rows)
        self._trim(self._shadow)

    def _trim(self, buffer: deque[Row]) -> None:
        overflow = len(buffer) - self._max_rows
        if overflow > 0:
            for _ in range(overflow):
                buffer.popleft()
            self._on_dropped(overflow)

    @property
    def pending(self) -> int:
        return len(self._buffer) + len(self._shadow)

    async def flush(self) -> None:
        async with self._flush_lock:
            # Served rows first: a shadow row is only judged next to the served row of its request.
            await self._flush(self._buffer, self.store.record_predictions)
            await self._flush(self._shadow, self.store.record_shadow_predictions)

    async def _flush(self, buffer: deque[Row], write: Callable[[Sequence[Row]], Awaitable[None]]) -> None:
        if not buffer:
            return
        batch = list(buffer)
        buffer.clear()
        try:
            await write(batch)
        except Exception:
            # Back to the front, in order, for the next flush; the buffer bound still applies.
            buffer.extendleft(reversed(batch))
            self._trim(buffer)
            raise

    async def wait_ready(self, timeout_s: float) -> bool:
        """True once the tables exist; False if PostgreSQL did not answer in time."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def _prepare(self) -> None:
        await self.store.open()
        delay = self._interval
        while True:
            try:
                await self.store.migrate()
                self._ready.set()
                return
            except Exception as exc:
                log.warning(
                    "feedback tables not ready (%s: %s); %d rows buffered", type(exc).__name__, exc, self.pending
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    async def _run(self) -> None:
        await self._prepare()
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.flush()
            except TRANSIENT_DB_ERRORS as exc:
                log.warning("predictions not stored yet (%s); %d rows buffered", exc, self.pending)
            except Exception:
                log.exception("storing predictions failed; %d rows buffered", self.pending)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        try:
            await self.flush()
        finally:
            await self.store.close()
