"""Writes served predictions to PostgreSQL in batches, off the request path.

A prediction's response never waits on the database: rows are buffered and flushed every
`PREDICTION_FLUSH_INTERVAL_S`. While PostgreSQL is away the buffer holds up to
`PREDICTION_BUFFER_ROWS` rows and then drops the oldest (counted), so an outage costs feedback
on those rows, never a prediction.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from core.database import TRANSIENT_DB_ERRORS
from services.feedback.store import FeedbackStore, PredictionRow

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
        self._on_dropped = on_dropped
        self._flush_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, rows: list[PredictionRow]) -> None:
        self._buffer.extend(rows)
        self._trim()

    def _trim(self) -> None:
        overflow = len(self._buffer) - self._max_rows
        if overflow > 0:
            for _ in range(overflow):
                self._buffer.popleft()
            self._on_dropped(overflow)

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def flush(self) -> None:
        async with self._flush_lock:
            if not self._buffer:
                return
            batch = list(self._buffer)
            self._buffer.clear()
            try:
                await self.store.record_predictions(batch)
            except Exception:
                # Back to the front, in order, for the next flush; the buffer bound still applies.
                self._buffer.extendleft(reversed(batch))
                self._trim()
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
