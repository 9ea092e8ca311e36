"""`up` and `down` of the local stack, component by component as cluster/components.py lists them."""

from __future__ import annotations

from typing import Any

from cluster.apps import require_api_keys
from cluster.components import components
from cluster.startup import StartupError
from cluster.supervisor import child_environment, managed, stop
from core.settings import Settings


def up(settings: Settings, report: Any = print) -> None:
    stack = components(settings)
    # Configuration and dependencies first, so a mistake costs nothing and leaves nothing running.
    # Serve and the UI both need a key: the stack as a whole does.
    require_api_keys(settings)
    for component in stack:
        if component.enabled and component.preflight is not None:
            component.preflight()
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(settings)
    started: list[str] = []
    try:
        for component in stack:
            if not component.enabled:
                if component.off is not None:
                    report(component.off)
                continue
            if component.start is None:
                continue
            outcome = component.start(env)
            if outcome == "started" and component.stop_grace_s is not None:
                started.append(component.name)
            report(component.announce.format(name=component.name, outcome=outcome, url=component.url))
    except StartupError:
        # A half-started stack helps nobody: stop what this call started, keep what was running.
        for name in reversed(started):
            stop(managed(settings, name), grace_s=5.0)
        raise


def down(settings: Settings, report: Any = print) -> None:
    """Stop every process `up` may have started, enabled now or not, the last started first."""
    for component in reversed(components(settings)):
        if component.stop_grace_s is None:
            continue
        stopped = stop(managed(settings, component.name), grace_s=component.stop_grace_s)
        if stopped or not component.optional:
            report(f"{component.name}: {'stopped' if stopped else 'not running'}")
