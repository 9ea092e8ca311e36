"""Health of each component of the local stack, as `cluster status` shows it."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.components import Component, components
from core.health import check
from core.settings import Settings


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    url: str
    healthy: bool
    detail: str


def probes(settings: Settings) -> list[Component]:
    """The components these settings run, each with the URL that tells whether it is healthy."""
    return [component for component in components(settings) if component.enabled]


def status(settings: Settings) -> list[ComponentStatus]:
    rows = []
    for probe in probes(settings):
        healthy, detail = check(probe.health_url, verify=probe.verify)
        rows.append(ComponentStatus(probe.name, probe.url, healthy, detail))
    return rows
