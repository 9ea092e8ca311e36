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
        Probe("ray", settings.ray.dashboard_url, f"{settings.ray.dashboard_url}/api/gcs_healthz"),
        Probe("mlflow", settings.mlflow.url, f"{settings.mlflow.url}/health"),
        Probe("serve", settings.serve.url, f"{settings.serve.url}/healthz"),
        Probe("model", f"{settings.serve.url}/docs", f"{settings.serve.url}/readyz"),
        # Gradio's page answers 200 with or without its login; a 200 means the UI serves.
        Probe("ui", settings.ui.url, f"{settings.ui.url}/"),
    ]
    if settings.training_jobs_enabled:
        metrics = f"{settings.dispatcher.url}/metrics"
        found.append(Probe("dispatcher", metrics, metrics))
    if nginx_binary(settings):
        found.append(Probe("nginx", settings.nginx.edge_url, edge_health_url(settings), str(local_ca_file(settings))))
    if settings.prometheus.enabled and nginx_exporter_enabled(settings):
        url = f"http://127.0.0.1:{settings.nginx.exporter_port}/metrics"
        found.append(Probe("nginx-exporter", url, url))
    if settings.prometheus.enabled and shutil.which("prometheus"):
        found.append(Probe("prometheus", settings.prometheus.url, f"{settings.prometheus.url}/-/ready"))
    if settings.prometheus.enabled and shutil.which("prometheus-alertmanager"):
        found.append(Probe("alertmanager", settings.alertmanager_url, f"{settings.alertmanager_url}/-/ready"))
    if settings.prometheus.enabled and settings.database.url and shutil.which("prometheus-postgres-exporter"):
        url = f"http://127.0.0.1:{settings.postgres.exporter_port}/metrics"
        found.append(Probe("postgres-exporter", url, url))
    return found
