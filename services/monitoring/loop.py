"""The loop both monitors run in the dispatcher: wait for the feedback tables, then refresh forever.

A failed refresh is logged and retried at the next interval: stale gauges would hide an outage
less well than missing ones, and the `up`-style alerts cover the database itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.feedback.store import FeedbackStore

log = logging.getLogger(__name__)


async def refresh_forever(
    store: FeedbackStore, refresh: Callable[[], Awaitable[Any]], interval_s: float, what: str
) -> None:
    """Open `store`, wait until its migrations ran, then call `refresh` every `interval_s`."""
    await store.open()
    while True:
        try:
            await store.migrate()
            break
        except Exception as exc:
            log.warning("feedback tables not ready (%s: %s); retrying", type(exc).__name__, exc)
            await asyncio.sleep(interval_s)
    while True:
        try:
            await refresh()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("%s not refreshed: %s: %s", what, type(exc).__name__, exc)
        await asyncio.sleep(interval_s)
