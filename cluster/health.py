"""Health probes for each component of the local stack."""

from __future__ import annotations

import shutil
from dataclasses import dataclass

from cluster.edge import edge_health_url, local_ca_file, nginx_binary
from cluster.observability import nginx_exporter_enabled
from core.settings import Settings


@dataclass(frozen=True)
class Probe:
    name: str
    url: str
    health_url: str
    verify: bool | str = True  # the CA for a locally issued certificate


def probes(settings: Settings) -> list[Probe]:
    found = [
        Probe("ray", settings.ray_dashboard_url, f"{settings.ray_dashboard_url}/api/gcs_healthz"),
        Probe("mlflow", settings.mlflow_url, f"{settings.mlflow_url}/health"),
        Probe("serve", settings.serve_url, f"{settings.serve_url}/healthz"),
        Probe("model", f"{settings.serve_url}/docs", f"{settings.serve_url}/readyz"),
        # Gradio's page answers 200 with or without its login; a 200 means the UI serves.
        Probe("ui", settings.ui_url, f"{settings.ui_url}/"),
    ]
    if settings.training_jobs_enabled:
        metrics = f"{settings.dispatcher_url}/metrics"
        found.append(Probe("dispatcher", metrics, metrics))
    if nginx_binary(settings):
        found.append(Probe("nginx", settings.edge_url, edge_health_url(settings), str(local_ca_file(settings))))
    if settings.prometheus_enabled and nginx_exporter_enabled(settings):
        url = f"http://127.0.0.1:{settings.nginx_exporter_port}/metrics"
        found.append(Probe("nginx-exporter", url, url))
    if settings.prometheus_enabled and shutil.which("prometheus"):
        found.append(Probe("prometheus", settings.prometheus_url, f"{settings.prometheus_url}/-/ready"))
    if settings.prometheus_enabled and shutil.which("prometheus-alertmanager"):
        found.append(Probe("alertmanager", settings.alertmanager_url, f"{settings.alertmanager_url}/-/ready"))
    if settings.prometheus_enabled and settings.database_url and shutil.which("prometheus-postgres-exporter"):
        url = f"http://127.0.0.1:{settings.postgres_exporter_port}/metrics"
        found.append(Probe("postgres-exporter", url, url))
    return found
