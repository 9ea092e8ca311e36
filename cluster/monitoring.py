"""Prometheus, Alertmanager and the exporters of the local stack as processes: configs rendered
into the state directory, started once, reloaded when `up` runs again. What the configs say is
cluster/observability.py's."""

from __future__ import annotations

from pathlib import Path

import httpx

from cluster.observability import (
    RULES_DIR,
    WEBHOOK_PATH,
    alert_durations,
    alert_expressions,
    alertmanager_config,
    dump,
    local_targets,
    prometheus_config,
    write_rules,
)
from cluster.startup import Listener, StartupError, require_free, start_process
from cluster.supervisor import log_tail, managed, read_pid, spawn, stop
from core.health import check, wait_healthy
from core.settings import Settings

# Each tool's executable, named as the Debian package that installs it.
BINARIES = {
    "prometheus": "prometheus",
    "alertmanager": "prometheus-alertmanager",
    "postgres-exporter": "prometheus-postgres-exporter",
    "nginx-exporter": "prometheus-nginx-exporter",
}


def _observability_dir(settings: Settings) -> Path:
    path = settings.state_dir / "observability"
    path.mkdir(parents=True, exist_ok=True)
    return path


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


def render_rules_dir(settings: Settings) -> Path:
    """The rules Prometheus reads: the shipped ones with the settings' `for:` durations and alert
    windows, rendered into the state directory; a directory PROMETHEUS_RULES_DIR names instead is
    used as it is."""
    chosen = settings.prometheus.rules_dir
    if chosen.resolve() != RULES_DIR.resolve():
        return chosen
    target = _observability_dir(settings) / "rules"
    return write_rules(target, alert_durations(settings), expressions=alert_expressions(settings))


def render_prometheus_config(settings: Settings) -> Path:
    targets = local_targets(settings, settings.ray.resolved_temp_dir, render_rules_dir(settings))
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
    require_free(settings.prometheus.host, port, name, f"{name.upper()}_PORT")
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


def postgres_exporter_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.postgres.exporter_port}/metrics"


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
    listener = Listener("127.0.0.1", settings.postgres.exporter_port, "POSTGRES_EXPORTER_PORT")
    env = {**env, "DATA_SOURCE_NAME": dsn}
    return start_process(settings, "postgres-exporter", argv, env, postgres_exporter_url(settings), listener)


def nginx_exporter_url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.nginx.exporter_port}/metrics"


def start_nginx_exporter(settings: Settings, env: dict[str, str], binary: str) -> str:
    argv = [
        binary, f"-nginx.scrape-uri=http://127.0.0.1:{settings.nginx.status_port}/stub_status",
        f"-web.listen-address=127.0.0.1:{settings.nginx.exporter_port}",
    ]  # fmt: skip
    listener = Listener("127.0.0.1", settings.nginx.exporter_port, "NGINX_EXPORTER_PORT")
    return start_process(settings, "nginx-exporter", argv, env, nginx_exporter_url(settings), listener)
