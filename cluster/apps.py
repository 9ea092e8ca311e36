"""The apps of the local stack: the Serve app, deployed onto the Ray head, and the Gradio UI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from cluster.startup import Listener, StartupError, first_line, start_process, venv_bin
from cluster.supervisor import managed, read_pid
from core.database import TRANSIENT_DB_ERRORS
from core.health import check, wait_until
from core.keys import ApiKeyTable, KeyNameTakenError, Scope, hash_api_key, new_api_key
from core.settings import Settings
from serve_apps.serve_config import with_knobs
from ui.errors import UI_SCOPES

SERVE_APP = "inference"
log = logging.getLogger("cluster")


# Serve -------------------------------------------------------------------------------------


def render_serve_config(settings: Settings) -> Path:
    """The shipped Serve config with host, port and the deployment's knobs taken from the settings."""
    shipped: dict[str, Any] = yaml.safe_load(settings.serve.config_path.read_text(encoding="utf-8"))
    config = with_knobs(shipped, settings.serve, settings.model, settings.max_batch_rows)
    config.setdefault("http_options", {}).update({"host": settings.serve.host, "port": settings.serve.port})
    if settings.tracing_enabled:
        # Serve's own tracing: spans for the proxy and every replica call, context carried
        # through deployment handles, exported by our OTLP processor.
        config["tracing_config"] = {
            "enabled": True,
            "exporter_import_path": "core.telemetry:serve_span_processors",
            "sampling_ratio": settings.otel.traces_sampler_ratio,
        }
    if settings.log_dir is not None:
        # Replicas, proxies and the controller write their JSON files where the collector tails
        # every node's logs (compose mounts LOG_DIR on each Ray node), not into a node's own
        # session directory, which only that node sees.
        config.setdefault("logging_config", {})["logs_dir"] = str(settings.log_dir / "serve")
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
        argv = [venv_bin("serve"), "deploy", str(config), "--address", settings.ray.dashboard_url]
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


# Gradio UI ---------------------------------------------------------------------------------------


# What the UI's calls need, and not admin: a leaked UI key cannot change what the platform runs
# beyond starting and cancelling its own training jobs.
UI_KEY_SCOPES: frozenset[Scope] = frozenset(Scope(name) for name in UI_SCOPES)
UI_KEY_FILE = "ui.key"
# `cluster up` waits this long for PostgreSQL before the UI falls back to an admin key.
UI_KEY_DB_WAIT_S = 5.0
# The database away or refusing (a missing database, no privilege), or the state directory not
# writable: none of them is worth a UI that does not start.
_UI_KEY_FAILURES: tuple[type[Exception], ...] = (*TRANSIENT_DB_ERRORS, psycopg.Error, OSError)


@dataclass(frozen=True)
class StoredUiKey:
    """The UI's key as `cluster up` keeps it between runs: the key, and its name in the table (the
    table holds only digests, and revoking goes by name)."""

    name: str
    key: str


def ui_environment(
    settings: Settings, env: dict[str, str], now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> dict[str, str]:
    """The UI calls the API like any client, with a key. UI_API_KEY is used as it is. Without it
    and with DATABASE_URL, the UI gets a key of its own with only the scopes it uses (see
    `provision_ui_key`); without a database, or while it is away, the first of API_KEYS, an
    admin key, so `cluster up` always yields a working UI."""
    if settings.ui.api_key is not None:
        return env
    key = provision_ui_key(settings, now) if settings.database.url is not None else None
    if key is None and settings.api.key_list():
        key = settings.api.key_list()[0]
        if settings.database.url is not None:
            log.warning("ui: runs with the first of API_KEYS, an admin key, until `cluster up` can register its own")
    return env if key is None else {**env, "UI_API_KEY": key}


def provision_ui_key(settings: Settings, now: Callable[[], datetime]) -> str | None:
    """The key kept in `state_dir/ui.key` while the table lists it as active with the UI's scopes;
    otherwise a new one, registered as `ui-<UTC time>`, which replaces it in the file, and the
    one it replaces is revoked. None, with a warning, where PostgreSQL cannot be used."""
    assert settings.database.url is not None
    path = settings.state_dir / UI_KEY_FILE
    stored = read_ui_key(path)
    dsn = settings.database.url.get_secret_value()
    table = ApiKeyTable(dsn, retry_for_s=UI_KEY_DB_WAIT_S, pool_timeout_s=UI_KEY_DB_WAIT_S)
    try:
        return asyncio.run(table.run_once(lambda t: _current_ui_key(t, stored, path, now)))
    except _UI_KEY_FAILURES as exc:
        log.warning("ui: could not register an API key of its own (%s: %s)", type(exc).__name__, first_line(exc))
        return None


async def _current_ui_key(
    table: ApiKeyTable, stored: StoredUiKey | None, path: Path, now: Callable[[], datetime]
) -> str:
    if stored is not None:
        principal = (await table.keys()).active.get(hash_api_key(stored.key))
        # Scopes compared too: a UI that comes to need another scope gets a key with it.
        if principal is not None and principal.name == stored.name and principal.scopes == UI_KEY_SCOPES:
            return stored.key
    key = new_api_key()
    name = await _register_ui_key(table, key, now())
    try:
        write_ui_key(path, StoredUiKey(name, key))
    except OSError:
        # A key nobody holds must not stay valid.
        await table.revoke(name)
        raise
    log.info("ui: registered API key %r with scopes %s", name, ",".join(sorted(UI_KEY_SCOPES)))
    if stored is not None:
        try:
            await table.revoke(stored.name)
        except TRANSIENT_DB_ERRORS as exc:
            log.warning(
                "ui: the previous UI key %r is not revoked (%s); revoke it with `python -m cluster keys revoke %s`",
                stored.name,
                first_line(exc),
                stored.name,
            )
    return key


async def _register_ui_key(table: ApiKeyTable, key: str, at: datetime) -> str:
    """Registered as `ui-<yyyymmddHHMMSS>`; names are never reused, so a second key within the
    same second takes a suffix."""
    base = f"ui-{at.astimezone(UTC):%Y%m%d%H%M%S}"
    for attempt in range(100):
        name = base if attempt == 0 else f"{base}-{attempt}"
        try:
            await table.add(name, hash_api_key(key), UI_KEY_SCOPES)
        except KeyNameTakenError:
            continue
        return name
    raise KeyNameTakenError(base)


def read_ui_key(path: Path) -> StoredUiKey | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return StoredUiKey(name=str(data["name"]), key=str(data["key"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("ui: ignoring %s (%s); the UI gets a new key", path, type(exc).__name__)
        return None


def write_ui_key(path: Path, stored: StoredUiKey) -> None:
    """Written whole or not at all, readable by this user only from the first byte on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.unlink(missing_ok=True)
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"name": stored.name, "key": stored.key}, file)
    os.replace(staging, path)


def start_ui(settings: Settings, env: dict[str, str]) -> str:
    argv = [sys.executable, "-m", "ui"]
    listener = Listener(settings.ui.host, settings.ui.port, "UI_PORT")
    health = f"{settings.ui.url}/"
    # A UI that runs keeps the key it started with: replacing (and revoking) that key now would
    # lock it out until its next start.
    if read_pid(managed(settings, "ui")) and check(health)[0]:
        return "already running"
    return start_process(settings, "ui", argv, ui_environment(settings, env), health, listener)
