"""The retraining loop's wall time: `POST /v1/training-jobs` until the new version answers
`/v1/predict`, through Nginx as a user sees it, with each phase's timestamp from the job record."""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx

from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW


def _served_version(client: httpx.Client) -> str | None:
    response = client.post("/v1/predict", json={"instances": [EXAMPLE_ROW]})
    if response.status_code != 200:
        return None
    version: str = response.json()["model"]["version"]
    return version


def _seconds(record: dict[str, Any], field: str, since: datetime) -> float | None:
    value = record.get(field)
    return (datetime.fromisoformat(value) - since).total_seconds() if value else None


def retrain_loop(client: httpx.Client, overrides: dict[str, Any], timeout_s: float = 900) -> dict[str, Any]:
    """One training request through the public API, followed until its model serves."""
    before = _served_version(client)
    started = time.monotonic()
    response = client.post("/v1/training-jobs", json={"kind": "train", "overrides": overrides})
    response.raise_for_status()
    job = response.json()
    created = datetime.fromisoformat(job["created_at"])
    record: dict[str, Any] = {}

    def finished() -> bool:
        record.update(client.get(f"/v1/training-jobs/{job['id']}").json())
        return record["state"] in {"succeeded", "failed", "dead_lettered"}

    if not wait_until(finished, timeout_s, max_wait_s=1.0):
        raise TimeoutError(f"training job {job['id']} did not finish in {timeout_s:.0f} s")
    job_done = time.monotonic() - started
    if record["state"] != "succeeded" or not record.get("promoted"):
        raise RuntimeError(f"training job {job['id']} ended {record['state']}, promoted={record.get('promoted')}")
    version = record["model_version"]
    if not wait_until(lambda: _served_version(client) == version, 120, max_wait_s=0.5):
        raise TimeoutError(f"version {version} was promoted but never served")
    return {
        "overrides": overrides,
        "wall_s": time.monotonic() - started,
        "job_succeeded_s": job_done,
        "submitted_s": _seconds(record, "submitted_at", created),
        "started_s": _seconds(record, "started_at", created),
        "finished_s": _seconds(record, "finished_at", created),
        "version_before": before,
        "version_after": version,
        "test_metrics": record.get("test_metrics"),
    }
