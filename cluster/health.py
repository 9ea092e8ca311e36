"""Health probes for each component, and waiting on readiness with backoff."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

import httpx
from tenacity import RetryError, retry, retry_if_result, stop_after_delay, wait_exponential

from cluster.settings import Settings


@dataclass(frozen=True)
class Probe:
    name: str
    url: str
    health_url: str


def probes(settings: Settings) -> list[Probe]:
    found = [
        Probe("ray", settings.ray_dashboard_url, f"{settings.ray_dashboard_url}/api/gcs_healthz"),
        Probe("mlflow", settings.mlflow_url, f"{settings.mlflow_url}/health"),
        Probe("serve", settings.serve_url, f"{settings.serve_url}/healthz"),
        Probe("model", f"{settings.serve_url}/docs", f"{settings.serve_url}/readyz"),
    ]
    if settings.training_jobs_enabled:
        metrics = f"{settings.dispatcher_url}/metrics"
        found.append(Probe("dispatcher", metrics, metrics))
    if settings.prometheus_enabled and shutil.which("prometheus"):
        found.append(Probe("prometheus", settings.prometheus_url, f"{settings.prometheus_url}/-/ready"))
    if settings.prometheus_enabled and shutil.which("prometheus-alertmanager"):
        found.append(Probe("alertmanager", settings.alertmanager_url, f"{settings.alertmanager_url}/-/ready"))
    if settings.prometheus_enabled and settings.database_url and shutil.which("prometheus-postgres-exporter"):
        url = f"http://127.0.0.1:{settings.postgres_exporter_port}/metrics"
        found.append(Probe("postgres-exporter", url, url))
    return found


def check(url: str, timeout_s: float = 3.0) -> tuple[bool, str]:
    try:
        response = httpx.get(url, timeout=timeout_s)
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


def wait_healthy(url: str, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Wait for an HTTP 200 at `url`; give up early once `alive` says the process died."""
    return wait_until(lambda: (not alive()) or check(url)[0], timeout_s) and check(url)[0]
