"""Writes served predictions to PostgreSQL in batches, off the request path.

A prediction's response never waits on the database: each request's predictions are buffered
whole (a `PredictionBatch`, which writes its rows' COPY lines when asked) and flushed every
`PREDICTION_FLUSH_INTERVAL_S` as one COPY (services/feedback/store.py). While PostgreSQL is away the
buffer holds up to `PREDICTION_BUFFER_ROWS` rows and then drops the oldest (counted), so an outage
costs feedback on those rows, never a prediction. A flush that fails goes back to the front of the
buffer, in order, and is written again by the next one; a row written by a flush whose commit went
unacknowledged is kept once (the store skips a request id and row already recorded).

The rows a rollout's other version scored for the same requests (serve_apps/shadow.py) wait in a
buffer of their own, with the same bound, and go out with the same flush.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

import psycopg

from core.database import TRANSIENT_DB_ERRORS
from services.feedback.store import FeedbackStore, PredictionBatch, PredictionRow, ShadowRow

Item = TypeVar("Item", PredictionRow | PredictionBatch, ShadowRow)

log = logging.getLogger("ray.serve")

# Errors that belong to the items written, not to the database: a value PostgreSQL refuses, or a
# record whose lines cannot be built. Retried, they would fail every later flush they are in.
_ITEM_ERRORS: tuple[type[Exception], ...] = (psycopg.DataError, ValueError, TypeError)


def rows_in(item: PredictionRow | PredictionBatch | ShadowRow) -> int:
    return len(item) if isinstance(item, PredictionBatch) else 1


class RowBuffer(Generic[Item]):
    """Items in arrival order, bounded in rows: the oldest rows go first (a batch loses its first
    rows, keeping the others' row indexes)."""

    def __init__(self, max_rows: int, on_dropped: Callable[[int], None]) -> None:
        self._items: deque[Item] = deque()
        self._max_rows = max_rows
        self._on_dropped = on_dropped
        self.rows = 0

    def __len__(self) -> int:
        """Items (a batch counts once; `rows` counts its rows)."""
        return len(self._items)

    def extend(self, items: Sequence[Item]) -> None:
        self._items.extend(items)
        self.rows += sum(map(rows_in, items))
        self._trim()

    def take(self) -> list[Item]:
        items = list(self._items)
        self._items.clear()
        self.rows = 0
        return items

    def put_back(self, items: Sequence[Item]) -> None:
        """Back to the front, in order, for the next flush; the bound still applies."""
        self._items.extendleft(reversed(items))
        self.rows += sum(map(rows_in, items))
        self._trim()

    def _trim(self) -> None:
        overflow = self.rows - self._max_rows
        if overflow <= 0:
            return
        dropped = 0
        while dropped < overflow:
            oldest = self._items[0]
            rows = rows_in(oldest)
            if rows <= overflow - dropped:
                self._items.popleft()
                dropped += rows
            else:
                assert isinstance(oldest, PredictionBatch)
                self._items[0] = oldest.without_first(overflow - dropped)  # type: ignore[assignment]
                dropped = overflow
        self.rows -= dropped
        self._on_dropped(dropped)


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
        self._buffer: RowBuffer[PredictionRow | PredictionBatch] = RowBuffer(max_rows, on_dropped)
        self._shadow: RowBuffer[ShadowRow] = RowBuffer(max_rows, on_dropped)
        self._on_dropped = on_dropped
        self._flush_lock = asyncio.Lock()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def record(self, rows: Sequence[PredictionRow | PredictionBatch]) -> None:
        """Served predictions: rows, or whole requests' batches."""
        self._buffer.extend(rows)

    def record_shadow(self, rows: list[ShadowRow]) -> None:
        """Rows a rollout's other version scored for served requests (never shown to a client)."""
        self._shadow.extend(rows)

    @property
    def pending(self) -> int:
        return self._buffer.rows + self._shadow.rows

    async def flush(self) -> None:
        async with self._flush_lock:
            # Served rows first: a shadow row is only judged next to the served row of its request.
            await self._flush(self._buffer, self.store.record_predictions)
            await self._flush(self._shadow, self.store.record_shadow_predictions)

    async def _flush(self, buffer: RowBuffer[Item], write: Callable[[Sequence[Item]], Awaitable[None]]) -> None:
        if not buffer:
            return
        items = buffer.take()
        try:
            await write(items)
        except _ITEM_ERRORS:
            # The items go one by one, and only the refused ones are dropped (counted).
            await self._isolate(buffer, items, write)
        except Exception:
            buffer.put_back(items)
            raise

    async def _isolate(
        self, buffer: RowBuffer[Item], items: Sequence[Item], write: Callable[[Sequence[Item]], Awaitable[None]]
    ) -> None:
        for position, item in enumerate(items):
            try:
                await write([item])
            except _ITEM_ERRORS as exc:
                log.error("a prediction record that cannot be stored is dropped: %s: %s", type(exc).__name__, exc)
                self._on_dropped(rows_in(item))
            except Exception:
                # The database went away meanwhile: what is left waits for the next flush.
                buffer.put_back(items[position:])
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
