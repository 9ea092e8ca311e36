"""compose.yaml as the static tests read it: its services and each one's environment."""

from __future__ import annotations

from typing import Any

import yaml

from core.settings import REPO_ROOT

COMPOSE_FILE = REPO_ROOT / "compose.yaml"


def compose() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8")))


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment:`, as a mapping whichever form it is written in."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(key): str(value) for key, value in env.items()}
