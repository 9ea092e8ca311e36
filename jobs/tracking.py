"""Reaching the MLflow tracking server, with one clear message when it is not there."""

from __future__ import annotations

from cluster.health import check, wait_healthy
from cluster.settings import Settings


class TrackingServerUnavailableError(RuntimeError):
    pass


def require_tracking_server(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait for the tracking server's health endpoint; fail with a fix-it message."""
    uri = settings.mlflow_tracking_uri
    if not uri.startswith(("http://", "https://")):
        return  # a file or database store needs no server
    health = f"{uri.rstrip('/')}/health"
    if not wait_healthy(health, timeout_s):
        raise TrackingServerUnavailableError(
            f"MLflow tracking server at {uri} is not reachable ({check(health)[1]}); "
            "start the stack with `python -m cluster up` or set MLFLOW_TRACKING_URI"
        )
