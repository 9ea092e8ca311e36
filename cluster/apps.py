"""The apps of the local stack: the Serve app, deployed onto the Ray head, and the Gradio UI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml

from cluster.startup import Listener, StartupError, start_process, venv_bin
from core.health import check, wait_until
from core.settings import Settings
from serve_apps.serve_config import with_knobs

SERVE_APP = "inference"


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
