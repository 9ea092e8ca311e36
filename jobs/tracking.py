"""Reaching the MLflow tracking server and its artifact store, with one clear message when either fails."""

from __future__ import annotations

import os
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

from core.health import check, wait_healthy
from core.settings import Settings

# MLflow's client retries a failed request for minutes by default, sized for the rate limits of
# hosted servers. Our tracking server answers a full or read-only artifact store with a 500 on
# every try, so a job sat on the upload long enough to look hung before it failed. Fewer retries
# still ride out a restart of the tracking server (tests/reliability/test_training_queue_faults.py
# restarts it under load). The variable, when set, decides.
HTTP_MAX_RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
HTTP_MAX_RETRIES = "5"
# MLflow's artifact repositories (local, HTTP proxy, S3, ...) live here: a failure raised from one
# of them is the store's, whatever exception type its backend uses.
_ARTIFACT_REPOSITORY_CODE = os.path.join("mlflow", "store", "artifact", "")


class TrackingServerUnavailableError(RuntimeError):
    pass


class ArtifactStoreError(RuntimeError):
    """The MLflow artifact store refused an upload: full, read-only or unreachable."""


def require_tracking_server(settings: Settings, timeout_s: float = 30.0) -> None:
    """Wait for the tracking server's health endpoint; fail with a fix-it message."""
    uri = settings.mlflow.tracking_uri
    if not uri.startswith(("http://", "https://")):
        return  # a file or database store needs no server
    health = f"{uri.rstrip('/')}/health"
    if not wait_healthy(health, timeout_s):
        raise TrackingServerUnavailableError(
            f"MLflow tracking server at {uri} is not reachable ({check(health)[1]}); "
            "start the stack with `python -m cluster up` or set MLFLOW_TRACKING_URI"
        )


def bound_request_retries() -> None:
    """Give up on a failing MLflow request sooner than MLflow's default (see above)."""
    os.environ.setdefault(HTTP_MAX_RETRIES_ENV, HTTP_MAX_RETRIES)


def _raised_by_artifact_repository(exc: BaseException) -> bool:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(_ARTIFACT_REPOSITORY_CODE in frame.filename for frame in traceback.extract_tb(current.__traceback__)):
            return True
        current = current.__cause__ or current.__context__
    return False


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@contextmanager
def artifact_upload(what: str) -> Iterator[None]:
    """Name the artifact store, and what to check there, when an upload in the block fails.

    MLflow's own error says only that a request failed: a server-side store (`mlflow server
    --artifacts-destination`) that is full or read-only reaches the client as "too many 500 error
    responses", with the cause in the server's log alone. Errors from elsewhere pass unchanged.
    """
    try:
        yield
    except Exception as exc:
        if not _raised_by_artifact_repository(exc):
            raise
        import mlflow

        run = mlflow.active_run()
        location = mlflow.get_artifact_uri() if run is not None else mlflow.get_tracking_uri()
        where = (
            f"where the tracking server at {mlflow.get_tracking_uri()} keeps artifacts (its "
            "--artifacts-destination, MLFLOW_ARTIFACTS_DESTINATION) and that server's log"
            if location.startswith("mlflow-artifacts:")
            else "at that location"
        )
        raise ArtifactStoreError(
            f"could not store {what} in the MLflow artifact store at {location} ({_first_line(exc)}). "
            f"The store is probably full or not writable: check free space and write access {where}."
        ) from exc
