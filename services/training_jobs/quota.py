"""How many training jobs one API key may have: at once, and started per hour.

A key that loops on `POST /v1/training-jobs` would otherwise fill the queue and hold the cluster's
CPUs for everyone. The limits count per key id; jobs the alert webhook or an operator start count
against no key. The store checks them under a per-key lock, in the transaction that inserts the job
(services/training_jobs/store.py), so concurrent requests of one key cannot overshoot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from core.settings import TrainingQueueSettings

QuotaLimit = Literal["active", "hourly"]
HOURLY_WINDOW = timedelta(hours=1)
# When the active limit is reached, nothing in the store says when a job will end: a train job
# may take seconds or hours. A client polling this often sees a slot soon after one frees up,
# without hammering the API while it waits.
ACTIVE_RETRY_AFTER_S = 30


@dataclass(frozen=True)
class JobQuota:
    max_active: int  # queued, submitted or running jobs of one key
    max_per_hour: int  # jobs one key started in the last hour, whatever became of them

    @classmethod
    def from_settings(cls, settings: TrainingQueueSettings) -> JobQuota:
        return cls(max_active=settings.max_active_per_key, max_per_hour=settings.max_per_hour_per_key)


class QuotaExceededError(Exception):
    """The key is at one of its limits; nothing was stored. `retry_after_s` is when trying again
    can succeed (the hourly limit) or is worth a look (the active limit)."""

    def __init__(self, limit: QuotaLimit, limit_value: int, retry_after_s: int, message: str) -> None:
        super().__init__(message)
        self.limit: QuotaLimit = limit
        self.limit_value = limit_value
        self.retry_after_s = retry_after_s
        self.message = message


def active_exceeded(max_active: int) -> QuotaExceededError:
    return QuotaExceededError(
        "active",
        max_active,
        ACTIVE_RETRY_AFTER_S,
        f"this API key already has {max_active} training job(s) queued or running (the limit, "
        "TRAINING_MAX_ACTIVE_PER_KEY); wait for one to end or cancel one",
    )


def hourly_exceeded(max_per_hour: int, leaves_window_at: datetime, now: datetime) -> QuotaExceededError:
    """`leaves_window_at`: when enough of the key's jobs of the last hour have left the window for
    one more to fit (the oldest one's start plus an hour, when the key is exactly at the limit)."""
    return QuotaExceededError(
        "hourly",
        max_per_hour,
        seconds_until(leaves_window_at, now),
        f"this API key started {max_per_hour} training job(s) in the last hour (the limit, "
        "TRAINING_MAX_PER_HOUR_PER_KEY)",
    )


def seconds_until(moment: datetime, now: datetime) -> int:
    """Whole seconds from `now` to `moment`, rounded up and at least 1: a client that waits this
    long is past the moment, and never told to retry at once."""
    return max(1, math.ceil((moment - now).total_seconds()))
