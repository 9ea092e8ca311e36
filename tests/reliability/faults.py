"""What the training fault tests share: predictions through the public API while the fault lasts,
and Ray jobs waited on with a deadline (a fault that makes a job hang must fail the test, not stall it)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from cluster.sandbox import Stack
from core.health import wait_until
from services.ray_submission import jobs_client
from tests.reliability.load import SteadyLoad

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def prediction_load(stack: Stack) -> SteadyLoad:
    """Predictions through the public API for as long as a fault test may take; a modest rate
    that still sees a failure within a tenth of a second and leaves the two shared cores to the
    training job under test."""
    return SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=10, connections=1, max_duration_s=900)


def wait_for_job(stack: Stack, job_id: str, timeout_s: float) -> tuple[str, str, float]:
    """The job's final status, its logs, and the seconds it took from this call to end."""
    jobs = jobs_client(stack.settings)
    started = time.monotonic()
    status = [""]

    def ended() -> bool:
        status[0] = str(jobs.get_job_status(job_id).value)
        return status[0] in TERMINAL

    if not wait_until(ended, timeout_s, max_wait_s=1):
        raise AssertionError(
            f"job {job_id} still {status[0]} after {timeout_s:.0f} s:\n{jobs.get_job_logs(job_id)[-3000:]}"
        )
    return status[0], jobs.get_job_logs(job_id), time.monotonic() - started


@contextlib.contextmanager
def stopped_when_done(stack: Stack, job_id: str) -> Iterator[None]:
    """A test that fails half-way leaves no job behind holding the cluster's CPUs."""
    try:
        yield
    finally:
        jobs = jobs_client(stack.settings)
        if str(jobs.get_job_status(job_id).value) not in TERMINAL:
            jobs.stop_job(job_id)
            wait_until(lambda: str(jobs.get_job_status(job_id).value) in TERMINAL, 60)
