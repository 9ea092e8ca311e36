"""Reaching the MLflow tracking server, with one clear message when it is not there."""

from __future__ import annotations

import httpx
from tenacity import retry, retry_if_exception_type, stop_after_delay, wait_exponential

from cluster.settings import Settings


class TrackingServerUnavailableError(RuntimeError):
    pass


def require_tracking_server(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait for the tracking server's health endpoint; fail with a fix-it message."""
    uri = settings.mlflow_tracking_uri
    if not uri.startswith(("http://", "https://")):
        return  # a file or database store needs no server

    @retry(
        retry=retry_if_exception_type(httpx.HTTPError),
        wait=wait_exponential(multiplier=0.2, max=3),
        stop=stop_after_delay(timeout_s),
        reraise=True,
    )
    def probe() -> None:
        httpx.get(f"{uri.rstrip('/')}/health", timeout=3).raise_for_status()

    try:
        probe()
    except httpx.HTTPError as exc:
        raise TrackingServerUnavailableError(
            f"MLflow tracking server at {uri} is not reachable ({exc}); "
            "start the stack with `python -m cluster up` or set MLFLOW_TRACKING_URI"
        ) from exc
