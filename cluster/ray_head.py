"""The Ray head node of the local stack (GCS, dashboard, Jobs API; Serve runs on it)."""

from __future__ import annotations

from cluster.startup import StartupError, require_free, venv_bin
from cluster.supervisor import local_cluster_environment, log_tail, managed, read_pid, spawn, stop
from core.health import check, wait_healthy
from core.settings import Settings


def ray_metrics_environment(settings: Settings) -> dict[str, str]:
    """Where the Ray dashboard finds Prometheus (and Grafana, for its embedded charts), and the
    ports of the head's own metrics servers (Ray reads them from the environment only)."""
    env = {
        "AUTOSCALER_METRIC_PORT": str(settings.ray.autoscaler_metrics_port),
        "DASHBOARD_METRIC_PORT": str(settings.ray.dashboard_metrics_port),
        "RAY_PROMETHEUS_HOST": settings.prometheus.url,
        "RAY_PROMETHEUS_NAME": "Prometheus",
        # Service name of Serve's proxy spans; replicas set their own in the Serve config.
        "OTEL_SERVICE_NAME": "ray-serve",
    }
    if settings.grafana.url:
        env["RAY_GRAFANA_HOST"] = settings.grafana.url
    return env


def start_ray(settings: Settings, env: dict[str, str]) -> str:
    item = managed(settings, "ray")
    if read_pid(item) and check(f"{settings.ray.dashboard_url}/api/gcs_healthz")[0]:
        return "already running"
    require_free(settings.ray.host, settings.ray.gcs_port, "ray", "RAY_GCS_PORT")
    require_free(settings.ray.dashboard_host, settings.ray.dashboard_port, "ray dashboard", "RAY_DASHBOARD_PORT")
    # Another Ray on this machine (a test's or a script's own) holds Ray's default metrics ports:
    # Ray would start without those metrics and Prometheus would find the targets down.
    require_free(
        settings.ray.host, settings.ray.autoscaler_metrics_port, "ray autoscaler metrics", "RAY_AUTOSCALER_METRICS_PORT"
    )
    require_free(
        settings.ray.host, settings.ray.dashboard_metrics_port, "ray dashboard metrics", "RAY_DASHBOARD_METRICS_PORT"
    )
    argv = [
        venv_bin("ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address", settings.ray.host,
        "--port", str(settings.ray.gcs_port),
        "--dashboard-host", settings.ray.dashboard_host,
        "--dashboard-port", str(settings.ray.dashboard_port),
        "--ray-client-server-port", str(settings.ray.client_port),
        "--dashboard-agent-listen-port", str(settings.ray.dashboard_agent_port),
        "--metrics-export-port", str(settings.ray.metrics_export_port),
        "--num-cpus", str(settings.ray.num_cpus),
    ]  # fmt: skip
    if settings.ray.temp_dir:
        argv += ["--temp-dir", str(settings.ray.temp_dir)]
    proc = spawn(item, argv, {**env, **ray_metrics_environment(settings), **local_cluster_environment(settings)})
    alive = lambda: proc.poll() is None  # noqa: E731
    ready = wait_healthy(f"{settings.ray.dashboard_url}/api/gcs_healthz", settings.startup_timeout_s, alive)
    version_url = f"{settings.ray.dashboard_url}/api/version"
    ready = ready and wait_healthy(version_url, settings.startup_timeout_s, alive, settings.ray.auth_headers())
    if not ready:
        stop(item)
        raise StartupError(f"ray: head node did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"
