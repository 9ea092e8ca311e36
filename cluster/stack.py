"""`up`, `down` and `status` of the local stack: Ray head, MLflow server, the Serve app."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.edge import edge_dir, edge_health_url, local_ca_file, nginx_binary, write_local_config
from cluster.health import probes
from cluster.observability import (
    WEBHOOK_PATH,
    alertmanager_config,
    dump,
    local_targets,
    nginx_exporter_enabled,
    prometheus_config,
)
from cluster.supervisor import child_environment, log_tail, managed, read_pid, spawn, stop
from core.health import check, wait_healthy, wait_until
from core.settings import Settings

SERVE_APP = "inference"


class StartupError(RuntimeError):
    """One line: what failed and how to fix it."""


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    url: str
    healthy: bool
    detail: str


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _require_free(host: str, port: int, what: str, setting: str) -> None:
    if _port_taken(host, port):
        raise StartupError(f"{what}: port {port} on {host} is already in use; stop what holds it or set {setting}")


@dataclass(frozen=True)
class Listener:
    """Where a started process answers, and the setting that moves it."""

    host: str
    port: int
    setting: str


def start_process(
    settings: Settings, name: str, argv: list[str], env: dict[str, str], health: str, listener: Listener
) -> str:
    """Start one long-running process unless it already answers, then wait until it is healthy."""
    item = managed(settings, name)
    if read_pid(item) and check(health)[0]:
        return "already running"
    _require_free(listener.host, listener.port, name, listener.setting)
    proc = spawn(item, argv, env)
    if not wait_healthy(health, settings.startup_timeout_s, lambda: proc.poll() is None):
        stop(item)
        raise StartupError(f"{name}: did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"


# MLflow ------------------------------------------------------------------------------------


def _check_backend(uri: str) -> None:
    if not uri.startswith("postgresql"):
        return
    import psycopg

    dsn = "postgresql://" + uri.split("://", 1)[1]
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            pass
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StartupError(
            f"mlflow: PostgreSQL backend not reachable ({first}); start PostgreSQL, create the database, "
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
    _require_free(settings.mlflow.host, settings.mlflow.port, "mlflow", "MLFLOW_PORT")
    _check_backend(settings.resolved_backend_store_uri)
    _check_artifacts(settings)
    argv = [
        _bin("mlflow"), "server",
        "--host", settings.mlflow.host,
        "--port", str(settings.mlflow.port),
        "--workers", str(settings.mlflow.workers),
        "--backend-store-uri", settings.resolved_backend_store_uri,
        "--artifacts-destination", settings.resolved_artifacts_destination,
        # /metrics for Prometheus; the directory holds the workers' shared counters.
        "--expose-prometheus", str(settings.state_dir / "mlflow-metrics"),
        # Its uvicorn workers log JSON lines like every other component.
        "--uvicorn-opts", f"--log-config {shlex.quote(str(mlflow_log_config(settings)))}",
    ]  # fmt: skip
    proc = spawn(item, argv, env)
    if not wait_healthy(f"{settings.mlflow.url}/health", settings.startup_timeout_s, lambda: proc.poll() is None):
        stop(item)
        raise StartupError(f"mlflow: server did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"


# Ray ---------------------------------------------------------------------------------------


def ray_metrics_environment(settings: Settings) -> dict[str, str]:
    """Where the Ray dashboard finds Prometheus (and Grafana, for its embedded charts)."""
    env = {
        "RAY_PROMETHEUS_HOST": settings.prometheus.url,
        "RAY_PROMETHEUS_NAME": "Prometheus",
        # Service name of Serve's proxy spans; replicas set their own in the Serve config.
        "OTEL_SERVICE_NAME": "ray-serve",
    }
    if settings.grafana.url:
        env["RAY_GRAFANA_HOST"] = settings.grafana.url
    return env


def start_ray(settings: Settings, env: dict[str, str]) -> str:
    item = managed(settings, "ray")
    if read_pid(item) and check(f"{settings.ray.dashboard_url}/api/gcs_healthz")[0]:
        return "already running"
    _require_free(settings.ray.host, settings.ray.gcs_port, "ray", "RAY_GCS_PORT")
    _require_free(settings.ray.dashboard_host, settings.ray.dashboard_port, "ray dashboard", "RAY_DASHBOARD_PORT")
    argv = [
        _bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", settings.ray.host,
        "--port", str(settings.ray.gcs_port),
        "--dashboard-host", settings.ray.dashboard_host,
        "--dashboard-port", str(settings.ray.dashboard_port),
        "--ray-client-server-port", str(settings.ray.client_port),
        "--dashboard-agent-listen-port", str(settings.ray.dashboard_agent_port),
        "--metrics-export-port", str(settings.ray.metrics_export_port),
        "--num-cpus", str(settings.ray.num_cpus),
    ]  # fmt: skip
    if settings.ray.temp_dir:
        argv += ["--temp-dir", str(settings.ray.temp_dir)]
    proc = spawn(item, argv, {**env, **ray_metrics_environment(settings)})
    alive = lambda: proc.poll() is None  # noqa: E731
    ready = wait_healthy(f"{settings.ray.dashboard_url}/api/gcs_healthz", settings.startup_timeout_s, alive)
    version_url = f"{settings.ray.dashboard_url}/api/version"
    ready = ready and wait_healthy(version_url, settings.startup_timeout_s, alive, settings.ray.auth_headers())
    if not ready:
        stop(item)
        raise StartupError(f"ray: head node did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"


# Dispatcher (asynchronous training) ------------------------------------------------------------


def ensure_jobs_database(settings: Settings) -> None:
    """Create the job database when the server is up but the database is not there yet."""
    import psycopg

    from core.database import plain_dsn

    assert settings.database.url is not None
    dsn = plain_dsn(settings.database.url.get_secret_value())
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            return
    except psycopg.OperationalError as exc:
        missing = "does not exist" in str(exc)
        if not missing:
            raise StartupError(
                f"dispatcher: PostgreSQL not reachable for DATABASE_URL ({_first_line(exc)}); "
                "start it or fix DATABASE_URL"
            ) from exc
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    name = str(info.get("dbname"))
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    except psycopg.errors.DuplicateDatabase:
        pass  # created concurrently
    except psycopg.Error as exc:
        raise StartupError(f"dispatcher: cannot create database {name!r} ({_first_line(exc)})") from exc


def check_broker(settings: Settings) -> None:
    import asyncio

    from services.training_jobs.broker import connect

    assert settings.amqp.url is not None
    url = settings.amqp.url.get_secret_value()

    async def probe() -> None:
        connection = await asyncio.wait_for(connect(url, "cluster up"), 10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        raise StartupError(
            f"dispatcher: RabbitMQ not reachable for AMQP_URL ({type(exc).__name__}: {_first_line(exc)}); "
            "start it or fix AMQP_URL"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def start_dispatcher(settings: Settings, env: dict[str, str]) -> str:
    listener = Listener(settings.dispatcher.host, settings.dispatcher.metrics_port, "DISPATCHER_METRICS_PORT")
    argv = [sys.executable, "-m", "services.dispatcher", "run"]
    return start_process(settings, "dispatcher", argv, env, f"{settings.dispatcher.url}/metrics", listener)


# Prometheus, Alertmanager, exporters ----------------------------------------------------------


def _observability_dir(settings: Settings) -> Path:
    path = settings.state_dir / "observability"
    path.mkdir(parents=True, exist_ok=True)
    return path


def observability_binaries() -> dict[str, str | None]:
    names = {
        "prometheus": "prometheus",
        "alertmanager": "prometheus-alertmanager",
        "postgres-exporter": "prometheus-postgres-exporter",
    }
    return {name: shutil.which(binary) for name, binary in names.items()}


def write_webhook_token(settings: Settings, directory: Path) -> Path | None:
    if settings.alert.webhook_token is None:
        return None
    token_file = directory / "alert_webhook_token"
    token_file.touch(mode=0o600, exist_ok=True)
    token_file.chmod(0o600)
    token_file.write_text(settings.alert.webhook_token.get_secret_value(), encoding="utf-8")
    return token_file


def render_alertmanager_config(settings: Settings) -> Path:
    directory = _observability_dir(settings)
    token_file = write_webhook_token(settings, directory)
    config = alertmanager_config(
        f"{settings.serve.url}{WEBHOOK_PATH}", str(token_file or directory / "alert_webhook_token"),
        settings.alertmanager.group_wait_s,
    )  # fmt: skip
    if token_file is None:
        # No token, no webhook: the alert still shows in Alertmanager, nothing is retrained.
        config["receivers"] = [{"name": r["name"]} for r in config["receivers"]]
    target = directory / "alertmanager.yml"
    target.write_text(dump(config, "# Rendered by `cluster up`.\n"), encoding="utf-8")
    return target


def render_prometheus_config(settings: Settings) -> Path:
    targets = local_targets(settings, settings.ray.resolved_temp_dir, settings.prometheus.rules_dir)
    target = _observability_dir(settings) / "prometheus.yml"
    target.write_text(dump(prometheus_config(targets), "# Rendered by `cluster up`.\n"), encoding="utf-8")
    return target


def _start_reloadable(
    settings: Settings, env: dict[str, str], name: str, base_url: str, port: int, argv: list[str]
) -> str:
    """Prometheus and Alertmanager: started once, reloaded when `up` runs again on a new config."""
    item = managed(settings, name)
    ready = f"{base_url}/-/ready"
    if read_pid(item) and check(ready)[0]:
        httpx.post(f"{base_url}/-/reload", timeout=5)
        return "already running (configuration reloaded)"
    _require_free(settings.prometheus.host, port, name, f"{name.upper()}_PORT")
    proc = spawn(item, argv, env)
    if not wait_healthy(ready, settings.startup_timeout_s, lambda: proc.poll() is None):
        stop(item)
        raise StartupError(f"{name}: did not become ready; see {item.log_file}: {log_tail(item, 1)}")
    return "started"


def start_alertmanager(settings: Settings, env: dict[str, str], binary: str) -> str:
    argv = [
        binary, f"--config.file={render_alertmanager_config(settings)}",
        f"--storage.path={_observability_dir(settings) / 'alertmanager-data'}",
        f"--web.listen-address={settings.prometheus.host}:{settings.alertmanager.port}",
        "--cluster.listen-address=",  # a single instance: no gossip port
        "--log.format=json",
    ]  # fmt: skip
    return _start_reloadable(settings, env, "alertmanager", settings.alertmanager_url, settings.alertmanager.port, argv)


def start_prometheus(settings: Settings, env: dict[str, str], binary: str) -> str:
    argv = [
        binary, f"--config.file={render_prometheus_config(settings)}",
        f"--storage.tsdb.path={_observability_dir(settings) / 'prometheus-data'}",
        "--storage.tsdb.retention.time=15d",
        f"--web.listen-address={settings.prometheus.host}:{settings.prometheus.port}",
        "--web.enable-lifecycle",  # reload after `cluster up` re-renders the config
        "--log.format=json",
    ]  # fmt: skip
    return _start_reloadable(settings, env, "prometheus", settings.prometheus.url, settings.prometheus.port, argv)


def start_postgres_exporter(settings: Settings, env: dict[str, str], binary: str) -> str:
    assert settings.database.url is not None
    import psycopg

    from core.database import plain_dsn

    dsn = plain_dsn(settings.database.url.get_secret_value())
    if "sslmode=" not in dsn:
        # The exporter's driver (lib/pq) knows no "prefer" and defaults to "require".
        host = str(psycopg.conninfo.conninfo_to_dict(dsn).get("host") or "localhost")
        mode = "disable" if host in {"localhost", "127.0.0.1", "::1"} or host.startswith("/") else "require"
        dsn += ("&" if "?" in dsn else "?") + f"sslmode={mode}"
    argv = [binary, f"--web.listen-address=127.0.0.1:{settings.postgres.exporter_port}", "--log.format=json"]
    url = f"http://127.0.0.1:{settings.postgres.exporter_port}/metrics"
    listener = Listener("127.0.0.1", settings.postgres.exporter_port, "POSTGRES_EXPORTER_PORT")
    return start_process(settings, "postgres-exporter", argv, {**env, "DATA_SOURCE_NAME": dsn}, url, listener)


def start_nginx_exporter(settings: Settings, env: dict[str, str], binary: str) -> str:
    argv = [
        binary, f"-nginx.scrape-uri=http://127.0.0.1:{settings.nginx.status_port}/stub_status",
        f"-web.listen-address=127.0.0.1:{settings.nginx.exporter_port}",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{settings.nginx.exporter_port}/metrics"
    listener = Listener("127.0.0.1", settings.nginx.exporter_port, "NGINX_EXPORTER_PORT")
    return start_process(settings, "nginx-exporter", argv, env, url, listener)


def start_observability(settings: Settings, env: dict[str, str], report: Any) -> list[str]:
    """Exporters, Alertmanager, then Prometheus; each only where its binary is installed."""
    started: list[str] = []
    if not settings.prometheus.enabled:
        report("prometheus: off (PROMETHEUS_ENABLED=false)")
        return started
    binaries = observability_binaries()
    missing = [name for name, path in binaries.items() if path is None]
    exporter = binaries["postgres-exporter"]
    if settings.database.url is not None and exporter:
        outcome = start_postgres_exporter(settings, env, exporter)
        started += ["postgres-exporter"] if outcome == "started" else []
        report(f"postgres-exporter: {outcome}")
    nginx_exporter = shutil.which("prometheus-nginx-exporter")
    if nginx_exporter and nginx_exporter_enabled(settings):
        outcome = start_nginx_exporter(settings, env, nginx_exporter)
        started += ["nginx-exporter"] if outcome == "started" else []
        report(f"nginx-exporter: {outcome}")
    for name, start in (("alertmanager", start_alertmanager), ("prometheus", start_prometheus)):
        binary = binaries[name]
        if binary is None:
            continue
        outcome = start(settings, env, binary)
        started += [name] if outcome == "started" else []
        url = settings.prometheus.url if name == "prometheus" else settings.alertmanager_url
        report(f"{name}: {outcome} at {url}")
    if missing:
        report(
            f"{', '.join(missing)}: not installed (apt-get install prometheus prometheus-alertmanager "
            "prometheus-postgres-exporter)"
        )
    return started


# Gradio UI ---------------------------------------------------------------------------------------


def ui_environment(settings: Settings, env: dict[str, str]) -> dict[str, str]:
    """The UI calls the API like any client, with a key. Without UI_API_KEY it gets the first of
    API_KEYS, so `cluster up` always yields a working UI; give it a key of its own (also listed
    in API_KEYS) where keys are rotated or revoked per client."""
    if settings.ui.api_key is not None or not settings.api.key_list():
        return env
    return {**env, "UI_API_KEY": settings.api.key_list()[0]}


def start_ui(settings: Settings, env: dict[str, str]) -> str:
    argv = [sys.executable, "-m", "ui"]
    listener = Listener(settings.ui.host, settings.ui.port, "UI_PORT")
    return start_process(settings, "ui", argv, ui_environment(settings, env), f"{settings.ui.url}/", listener)


# Nginx (the edge) ----------------------------------------------------------------------------------


def start_nginx(settings: Settings, env: dict[str, str], binary: str, ui: str | None) -> str:
    """TLS termination and the routes to every UI; reloaded in place when `up` runs again."""
    item = managed(settings, "nginx")
    rendered = edge_dir(settings) / "nginx.conf"
    previous = rendered.read_text(encoding="utf-8") if rendered.is_file() else None
    config = write_local_config(settings, ui)
    argv = [binary, "-p", str(edge_dir(settings)), "-c", str(config), "-e", "stderr"]
    checked = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, check=False)
    if checked.returncode != 0:
        raise StartupError(f"nginx: configuration {config} rejected: {checked.stderr.strip().splitlines()[-1:]}")
    verify = str(local_ca_file(settings))
    pid = read_pid(item)
    if pid is not None:
        if config.read_text(encoding="utf-8") == previous:
            # A reload closes every idle kept-alive connection, and a client that sends on one
            # at that moment gets a reset: restarting another component must not cost that.
            return "already running"
        os.kill(pid, signal.SIGHUP)  # graceful reload: old workers finish their requests
        return "already running (configuration reloaded)"
    _require_free(settings.nginx.host, settings.nginx.https_port, "nginx", "NGINX_HTTPS_PORT")
    _require_free(settings.nginx.host, settings.nginx.http_port, "nginx", "NGINX_HTTP_PORT")
    proc = spawn(item, [*argv, "-g", "daemon off;"], env)
    if not wait_healthy(
        edge_health_url(settings), settings.startup_timeout_s, lambda: proc.poll() is None, verify=verify
    ):
        stop(item)
        raise StartupError(f"nginx: did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"


def start_edge(settings: Settings, env: dict[str, str], report: Any, ui: str | None) -> list[str]:
    binary = nginx_binary(settings)
    if not settings.nginx.enabled:
        report("nginx: off (NGINX_ENABLED=false)")
        return []
    if binary is None:
        report("nginx: not installed (apt-get install nginx); the API is reachable only without TLS")
        return []
    outcome = start_nginx(settings, env, binary, ui)
    report(f"nginx: {outcome} at {settings.nginx.edge_url}")
    return ["nginx"] if outcome == "started" else []


# Serve -------------------------------------------------------------------------------------


def render_serve_config(settings: Settings) -> Path:
    """The shipped Serve config with host and port taken from the settings."""
    config: dict[str, Any] = yaml.safe_load(settings.serve.config_path.read_text(encoding="utf-8"))
    config.setdefault("http_options", {}).update({"host": settings.serve.host, "port": settings.serve.port})
    for app in config.get("applications", []):
        for deployment in app.get("deployments", []):
            scaling = deployment.get("autoscaling_config")
            if scaling is not None:
                low = settings.serve.min_replicas
                scaling.update(
                    min_replicas=low,
                    initial_replicas=low,
                    max_replicas=max(low, settings.serve.max_replicas),
                )
    if settings.tracing_enabled:
        # Serve's own tracing: spans for the proxy and every replica call, context carried
        # through deployment handles, exported by our OTLP processor.
        config["tracing_config"] = {
            "enabled": True,
            "exporter_import_path": "core.telemetry:serve_span_processors",
            "sampling_ratio": settings.otel.traces_sampler_ratio,
        }
    target = settings.state_dir / "serve_config.yaml"
    target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return target


def serve_app_status(settings: Settings) -> tuple[str, str]:
    try:
        url = f"{settings.ray.dashboard_url}/api/serve/applications/"
        response = httpx.get(url, timeout=5, headers=settings.ray.auth_headers())
        app = response.json().get("applications", {}).get(SERVE_APP, {})
    except (httpx.HTTPError, ValueError):
        return "UNKNOWN", "dashboard not reachable"
    return str(app.get("status", "NOT_STARTED")), str(app.get("message", ""))


def require_api_keys(settings: Settings) -> None:
    if not settings.api.key_list():
        raise StartupError(
            "serve: API_KEYS is not set; the inference API refuses to start without a key. "
            "Add API_KEYS=<key> to .env (`make demo` generates one)"
        )


def deploy_serve(settings: Settings, env: dict[str, str]) -> str:
    require_api_keys(settings)
    config = render_serve_config(settings)
    attempts: list[subprocess.CompletedProcess[str]] = []

    def deployed() -> bool:
        # The dashboard answers before its Serve module does; a refused deploy is retried.
        argv = [_bin("serve"), "deploy", str(config), "--address", settings.ray.dashboard_url]
        attempts.append(subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False))
        return attempts[-1].returncode == 0

    if not wait_until(deployed, 60):
        result = attempts[-1]
        last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StartupError(f"serve: deploy failed: {last[0]}")

    def settled() -> bool:
        status, _ = serve_app_status(settings)
        return status in {"RUNNING", "DEPLOY_FAILED", "UNHEALTHY"} and (
            status != "RUNNING" or check(f"{settings.serve.url}/healthz")[0]
        )

    wait_until(settled, settings.startup_timeout_s)
    status, message = serve_app_status(settings)
    if status != "RUNNING":
        reason = message.strip().splitlines()[-1] if message.strip() else status
        raise StartupError(f"serve: application {SERVE_APP} is {status}: {reason}")
    return "deployed"


# The whole stack -------------------------------------------------------------------------------


def up(settings: Settings, report: Any = print) -> None:
    # Configuration and dependencies first, so a mistake costs nothing and leaves nothing running.
    require_api_keys(settings)
    if settings.training_jobs_enabled:
        ensure_jobs_database(settings)
        check_broker(settings)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings)
    started: list[str] = []
    try:
        outcome = start_mlflow(settings, env)
        started += ["mlflow"] if outcome == "started" else []
        report(f"mlflow: {outcome} at {settings.mlflow.url}")
        outcome = start_ray(settings, env)
        started += ["ray"] if outcome == "started" else []
        report(f"ray: {outcome}, dashboard at {settings.ray.dashboard_url}")
        if settings.training_jobs_enabled:
            outcome = start_dispatcher(settings, env)
            started += ["dispatcher"] if outcome == "started" else []
            report(f"dispatcher: {outcome}, metrics at {settings.dispatcher.url}/metrics")
        else:
            report("dispatcher: off (set DATABASE_URL and AMQP_URL for asynchronous training)")
        report(f"serve: {deploy_serve(settings, env)} at {settings.serve.url}")
        outcome = start_ui(settings, env)
        started += ["ui"] if outcome == "started" else []
        report(f"ui: {outcome} at {settings.ui.url}")
        started += start_edge(settings, env, report, ui=settings.ui.url.removeprefix("http://"))
        started += start_observability(settings, env, report)
    except StartupError:
        # A half-started stack helps nobody: stop what this call started, keep what was running.
        for name in reversed(started):
            stop(managed(settings, name), grace_s=5.0)
        raise


def down(settings: Settings, report: Any = print) -> None:
    # The GCS keeps its state in memory and holds on to SIGTERM for tens of seconds; nothing is
    # lost by killing it after a short grace. MLflow's workers finish their requests first.
    # The dispatcher goes first: requests it holds return to the queue, its Ray jobs keep running.
    components = (
        ("nginx", 5.0),
        ("prometheus", 10.0),
        ("alertmanager", 10.0),
        ("postgres-exporter", 5.0),
        ("nginx-exporter", 5.0),
        ("ui", 5.0),
        ("dispatcher", 10.0),
        ("ray", 5.0),
        ("mlflow", 20.0),
    )
    optional = {"nginx", "prometheus", "alertmanager", "postgres-exporter", "nginx-exporter"}
    for name, grace_s in components:
        stopped = stop(managed(settings, name), grace_s=grace_s)
        if stopped or name not in optional:
            report(f"{name}: {'stopped' if stopped else 'not running'}")


def status(settings: Settings) -> list[ComponentStatus]:
    rows = []
    for probe in probes(settings):
        healthy, detail = check(probe.health_url, verify=probe.verify)
        rows.append(ComponentStatus(probe.name, probe.url, healthy, detail))
    return rows
