"""The local stack's components, in start order: the one list that `up` starts, `down` stops and
`status` probes, so a component added here is started, stopped and checked everywhere."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from cluster.apps import deploy_serve, start_ui
from cluster.dispatcher import check_dependencies, start_dispatcher
from cluster.edge import edge_health_url, local_ca_file, nginx_binary
from cluster.mlflow_server import start_mlflow
from cluster.monitoring import (
    BINARIES,
    nginx_exporter_url,
    postgres_exporter_url,
    start_alertmanager,
    start_nginx_exporter,
    start_postgres_exporter,
    start_prometheus,
)
from cluster.nginx_server import start_nginx
from cluster.ray_head import start_ray
from core.settings import Settings

# Given the child environment, start (or find running, or reload) the component; says which.
Starter = Callable[[dict[str, str]], str]


class ToolStarter(Protocol):
    def __call__(self, settings: Settings, env: dict[str, str], binary: str) -> str: ...


@dataclass(frozen=True)
class Component:
    name: str
    url: str  # where users reach it: `up` and `status` show it
    health_url: str
    verify: bool | str = True  # the CA for a locally issued certificate
    enabled: bool = True  # configured, and its tool installed, for these settings
    start: Starter | None = None  # None: it comes up with another (the model with the Serve app)
    announce: str = "{name}: {outcome} at {url}"  # what `up` says once it runs
    off: str | None = None  # what `up` says instead where it is not enabled
    preflight: Callable[[], None] | None = None  # run before anything starts, where enabled
    stop_grace_s: float | None = None  # None: no process of its own; it stops with its host
    optional: bool = False  # may not be installed: `down` names it only when it stopped it


def _tool(
    settings: Settings,
    name: str,
    *,
    wanted: bool,
    start: ToolStarter,
    url: str,
    health_url: str,
    stop_grace_s: float,
    announce: str = Component.announce,
    unwanted: str | None = None,
) -> Component:
    """A monitoring tool: started where it is wanted and its package is installed."""
    binary = shutil.which(BINARIES[name]) if wanted else None
    if binary is None:
        off = f"{name}: not installed (apt-get install {BINARIES[name]})" if wanted else unwanted
        return Component(name, url, health_url, enabled=False, off=off, stop_grace_s=stop_grace_s, optional=True)
    starter = partial(start, settings, binary=binary)
    return Component(name, url, health_url, start=starter, announce=announce, stop_grace_s=stop_grace_s, optional=True)


def _nginx(settings: Settings) -> Component:
    binary = nginx_binary(settings)
    url, health_url, verify = settings.nginx.edge_url, edge_health_url(settings), str(local_ca_file(settings))
    if binary is None:
        off = (
            "nginx: not installed (apt-get install nginx); the API is reachable only without TLS"
            if settings.nginx.enabled
            else "nginx: off (NGINX_ENABLED=false)"
        )
        return Component("nginx", url, health_url, verify, enabled=False, off=off, stop_grace_s=5.0, optional=True)
    start = partial(start_nginx, settings, binary=binary, ui=settings.ui.url.removeprefix("http://"))
    return Component("nginx", url, health_url, verify, start=start, stop_grace_s=5.0, optional=True)


def components(settings: Settings) -> list[Component]:
    """Every component `up` may start, in the order it starts them; `down` stops them in reverse."""
    s = settings
    monitoring = s.prometheus.enabled
    dispatcher_metrics = f"{s.dispatcher.url}/metrics"
    exporter_metrics, nginx_metrics = postgres_exporter_url(s), nginx_exporter_url(s)
    return [
        # Its workers finish their requests before they exit.
        Component("mlflow", s.mlflow.url, f"{s.mlflow.url}/health", start=partial(start_mlflow, s), stop_grace_s=20.0),
        # The GCS keeps its state in memory and holds on to SIGTERM for tens of seconds; nothing is
        # lost by killing it after a short grace.
        Component(
            "ray",
            s.ray.dashboard_url,
            f"{s.ray.dashboard_url}/api/gcs_healthz",
            start=partial(start_ray, s),
            announce="{name}: {outcome}, dashboard at {url}",
            stop_grace_s=5.0,
        ),
        # Stopped before Ray: the requests it holds return to the queue, its Ray jobs keep running.
        Component(
            "dispatcher",
            dispatcher_metrics,
            dispatcher_metrics,
            enabled=s.training_jobs_enabled,
            start=partial(start_dispatcher, s),
            announce="{name}: {outcome}, metrics at {url}",
            off="dispatcher: off (set DATABASE_URL and AMQP_URL for asynchronous training)",
            preflight=partial(check_dependencies, s),
            stop_grace_s=10.0,
        ),
        # Deployed onto the Ray head, it stops with it.
        Component("serve", s.serve.url, f"{s.serve.url}/healthz", start=partial(deploy_serve, s)),
        Component("model", f"{s.serve.url}/docs", f"{s.serve.url}/readyz"),
        # Gradio's page answers 200 with or without its login; a 200 means the UI serves.
        Component("ui", s.ui.url, f"{s.ui.url}/", start=partial(start_ui, s), stop_grace_s=5.0),
        _nginx(s),
        # Exporters before the Prometheus that scrapes them, Alertmanager before the Prometheus that
        # sends to it.
        _tool(
            s,
            "postgres-exporter",
            wanted=monitoring and s.database.url is not None,
            start=start_postgres_exporter,
            url=exporter_metrics,
            health_url=exporter_metrics,
            stop_grace_s=5.0,
            announce="{name}: {outcome}",
        ),
        _tool(
            s,
            "nginx-exporter",
            wanted=monitoring and nginx_binary(s) is not None,
            start=start_nginx_exporter,
            url=nginx_metrics,
            health_url=nginx_metrics,
            stop_grace_s=5.0,
            announce="{name}: {outcome}",
        ),
        _tool(
            s,
            "alertmanager",
            wanted=monitoring,
            start=start_alertmanager,
            url=s.alertmanager_url,
            health_url=f"{s.alertmanager_url}/-/ready",
            stop_grace_s=10.0,
        ),
        _tool(
            s,
            "prometheus",
            wanted=monitoring,
            start=start_prometheus,
            url=s.prometheus.url,
            health_url=f"{s.prometheus.url}/-/ready",
            stop_grace_s=10.0,
            unwanted="prometheus: off (PROMETHEUS_ENABLED=false)",
        ),
    ]
