"""Health probes for each component, and waiting on readiness with backoff."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tenacity import RetryError, retry, retry_if_result, stop_after_delay, wait_exponential

from cluster.edge import edge_health_url, local_ca_file, nginx_binary
from cluster.observability import nginx_exporter_enabled
from cluster.settings import Settings


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


def check(
    url: str, timeout_s: float = 3.0, headers: dict[str, str] | None = None, verify: bool | str = True
) -> tuple[bool, str]:
    try:
        response = httpx.get(url, timeout=timeout_s, headers=headers, verify=verify)
    except httpx.HTTPError as exc:
        return False, f"unreachable ({type(exc).__name__})"
    if response.status_code == 200:
        return True, "healthy"
    return False, f"HTTP {response.status_code}"


def wait_until(predicate: Callable[[], bool], timeout_s: float, max_wait_s: float = 2.0) -> bool:
    """Poll `predicate` with exponential backoff; True once it holds, False at the deadline."""

    @retry(
        retry=retry_if_result(lambda ok: not ok),
        wait=wait_exponential(multiplier=0.1, max=max_wait_s),
        stop=stop_after_delay(timeout_s),
    )
    def attempt() -> bool:
        return predicate()

    try:
        return attempt()
    except RetryError:
        return False


def wait_healthy(
    url: str,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    headers: dict[str, str] | None = None,
    verify: bool | str = True,
) -> bool:
    """Wait for an HTTP 200 at `url`; give up early once `alive` says the process died."""

    def ok() -> bool:
        return check(url, headers=headers, verify=verify)[0]

    return wait_until(lambda: (not alive()) or ok(), timeout_s) and ok()
