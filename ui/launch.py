"""Start the UI: login policy, logging and tracing, then Gradio's server."""

from __future__ import annotations

import logging
from typing import Any

from starlette.middleware import Middleware

from core.logs import configure_logging
from core.settings import Settings
from core.telemetry import init_tracing
from ui.actions import UiActions
from ui.app import build_app
from ui.proxy import ForwardedPrefixMiddleware

log = logging.getLogger("ui")


class UiConfigError(RuntimeError):
    """One line: what is wrong with the UI's configuration and how to fix it."""


def login_credentials(settings: Settings) -> list[tuple[str, str]] | None:
    """The accounts of Gradio's login, or None for no login (local development only)."""
    if settings.ui.password is not None:
        password = settings.ui.password.get_secret_value()
        if not password.strip() or not settings.ui.username.strip():
            raise UiConfigError("ui: UI_USERNAME and UI_PASSWORD must not be blank")
        return [(settings.ui.username, password)]
    if settings.ui_login_required:
        raise UiConfigError(
            f"ui: DEPLOYMENT_ENVIRONMENT={settings.deployment_environment} needs a login; set UI_PASSWORD "
            "(and UI_USERNAME, default admin), or DEPLOYMENT_ENVIRONMENT=development on a private machine"
        )
    return None


def launch_options(settings: Settings, credentials: list[tuple[str, str]] | None) -> dict[str, Any]:
    """`Blocks.launch` arguments: address, login, and the prefix handling for Nginx."""
    return {
        "server_name": settings.ui.host,
        "server_port": settings.ui.port,
        "root_path": settings.ui.root_path,
        "auth": credentials,
        "auth_message": "Sign in to the Ray cluster platform" if credentials else None,
        "app_kwargs": {"middleware": [Middleware(ForwardedPrefixMiddleware)]},
        "footer_links": ["api", "settings"],
        "quiet": True,
        # An unexpected failure shows its message on the page instead of a bare "Error".
        "show_error": True,
        "ssr_mode": False,
    }


def serve(settings: Settings) -> None:
    """Blocks until the process is stopped."""
    credentials = login_credentials(settings)
    configure_logging("ui", settings.log_level, with_ray=False)
    init_tracing("ui", settings)
    actions = UiActions.from_settings(settings)
    demo = build_app(actions)
    # Handlers mostly wait on the API; more than one at a time keeps the page responsive.
    demo.queue(default_concurrency_limit=8)
    log.info(
        "UI on %s for the inference API at %s (key %s, login %s)",
        settings.ui.url,
        actions.api.base_url,
        "configured" if actions.api.has_key else "MISSING",
        "on" if credentials else "off",
    )
    try:
        demo.launch(**launch_options(settings, credentials))
    finally:
        actions.close()
