"""The MLflow tracking server of the local stack, and the logging config compose gives it too."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from cluster.startup import StartupError, first_line, require_free, venv_bin
from cluster.supervisor import log_tail, managed, read_pid, spawn, stop
from core.health import check, wait_healthy
from core.settings import Settings

# Seconds uvicorn waits for a worker to answer its liveness ping before replacing it.
WORKER_HEALTHCHECK_TIMEOUT_S = 60


def _check_backend(uri: str) -> None:
    if not uri.startswith("postgresql"):
        return
    import psycopg

    dsn = "postgresql://" + uri.split("://", 1)[1]
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        raise StartupError(
            f"mlflow: PostgreSQL backend not reachable ({first_line(exc)}); start PostgreSQL, create the database, "
            "or fix MLFLOW_BACKEND_STORE_URI"
        ) from exc


def _check_artifacts(settings: Settings) -> None:
    destination = settings.resolved_artifacts_destination
    if not destination.startswith("s3://"):
        Path(destination).mkdir(parents=True, exist_ok=True)
        return
    from jobs.data.storage import s3_client, split_s3_uri

    bucket = split_s3_uri(destination + "/x")[0]
    try:
        client = s3_client(settings)
        try:
            client.head_bucket(Bucket=bucket)
        except client.exceptions.ClientError:
            client.create_bucket(Bucket=bucket)
    except Exception as exc:
        raise StartupError(
            f"mlflow: artifact store {destination} not reachable ({type(exc).__name__}: {exc}); "
            "check S3_ENDPOINT_URL, S3_BUCKET and the access keys"
        ) from exc


def mlflow_log_config(settings: Settings) -> Path:
    """A logging dictConfig for MLflow's uvicorn workers, formatting with core.logs."""
    handler = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}
    quiet = {"handlers": ["stderr"], "level": "INFO", "propagate": False}
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "core.logs.JsonFormatter", "service": "mlflow"}},
        "handlers": {"stderr": handler},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {name: quiet for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "mlflow")},
    }
    path = settings.state_dir / "mlflow-logging.json"
    path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return path


def start_mlflow(settings: Settings, env: dict[str, str]) -> str:
    item = managed(settings, "mlflow")
    if read_pid(item) and check(f"{settings.mlflow.url}/health")[0]:
        return "already running"
    require_free(settings.mlflow.host, settings.mlflow.port, "mlflow", "MLFLOW_PORT")
    _check_backend(settings.resolved_backend_store_uri)
    _check_artifacts(settings)
    argv = [
        venv_bin("mlflow"), "server",
        "--host", settings.mlflow.host,
        "--port", str(settings.mlflow.port),
        "--workers", str(settings.mlflow.workers),
        "--backend-store-uri", settings.resolved_backend_store_uri,
        "--artifacts-destination", settings.resolved_artifacts_destination,
        # /metrics for Prometheus; the directory holds the workers' shared counters.
        "--expose-prometheus", str(settings.state_dir / "mlflow-metrics"),
        # Its uvicorn workers log JSON lines like every other component. A worker answers uvicorn's
        # liveness ping only once it has imported MLflow; on a loaded node that takes longer than
        # uvicorn's default wait, and the supervisor would kill and respawn workers in a loop.
        "--uvicorn-opts",
        f"--log-config {shlex.quote(str(mlflow_log_config(settings)))} "
        f"--timeout-worker-healthcheck {WORKER_HEALTHCHECK_TIMEOUT_S}",
    ]  # fmt: skip
    proc = spawn(item, argv, env)
    if not wait_healthy(f"{settings.mlflow.url}/health", settings.startup_timeout_s, lambda: proc.poll() is None):
        stop(item)
        raise StartupError(f"mlflow: server did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"
