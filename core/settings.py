"""The platform's one typed settings object, read from the environment and `.env`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the platform.

    Embedded defaults run the whole stack on a bare machine (MLflow on SQLite, artifacts on local
    disk, the shipped data set). Secrets have no defaults.
    """

    # The repository's .env, then one in the working directory (which wins), so the CLI reads the
    # same values wherever it is started from.
    model_config = SettingsConfigDict(env_file=(REPO_ROOT / ".env", ".env"), env_file_encoding="utf-8", extra="ignore")

    # Where `cluster up` keeps pid files, logs, the SQLite store and local artifacts.
    state_dir: Path = REPO_ROOT / ".state"

    # Ray head. 6379 belongs to Redis on the dev machines, hence 6380.
    ray_host: str = "127.0.0.1"
    # Address drivers connect to; unset means a running local cluster, else a fresh local one.
    ray_address: str | None = None
    ray_gcs_port: int = 6380
    ray_dashboard_host: str = "127.0.0.1"
    ray_dashboard_port: int = 8265
    ray_client_port: int = 10001
    # The head's HTTP agent (Jobs API back end); fixed so that Prometheus and firewalls can name it.
    ray_dashboard_agent_port: int = 52365
    ray_metrics_export_port: int = 8090
    # Logical CPUs the head advertises. Training workers and Ray Data tasks mostly wait on each
    # other, so advertising more than the physical cores avoids resource deadlocks on small boxes.
    ray_num_cpus: int = Field(default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)))
    # Short temp dir: Ray's unix sockets must fit in 107 characters.
    ray_temp_dir: Path | None = None
    # Where Ray Train keeps checkpoints; a shared URI (s3://...) once there are several nodes.
    ray_storage_path: str | None = None

    # Ray Serve HTTP proxy.
    serve_host: str = "127.0.0.1"
    serve_port: int = 8000
    serve_config_path: Path = REPO_ROOT / "serve_apps" / "config.yaml"

    # MLflow tracking server and the clients that talk to it.
    mlflow_host: str = "127.0.0.1"
    mlflow_port: int = 5000
    # Default: the server `cluster up` starts, at mlflow_host:mlflow_port (so moving the port moves both).
    mlflow_tracking_uri: str = ""
    mlflow_backend_store_uri: str | None = None  # default: SQLite under state_dir
    mlflow_artifacts_destination: str | None = None  # default: S3 bucket if set, else state_dir
    mlflow_experiment: str = "adult-income"
    mlflow_workers: int = 2

    # How long `cluster up` waits for each component to report healthy.
    startup_timeout_s: float = 180.0

    # Object store (MinIO in compose, any S3-compatible server elsewhere).
    s3_endpoint_url: str | None = None
    s3_bucket: str | None = None
    s3_region: str = "us-east-1"
    aws_access_key_id: SecretStr | None = None
    aws_secret_access_key: SecretStr | None = None

    # Recorded on every run; set when the code travels without its .git (containers, Ray jobs).
    git_commit: str | None = None

    # Inference API.
    api_keys: SecretStr | None = None  # comma-separated; no default on purpose
    # How often each ingress replica re-reads the key table (`python -m cluster keys`, needs
    # DATABASE_URL): an added key is accepted, a revoked one refused, within this many seconds.
    api_key_refresh_s: float = Field(default=5.0, gt=0)
    # The registered model the API serves. Training never reads it: a job registers under its
    # config's `name` (or `model_name`).
    model_name: str = "adult-income"
    champion_alias: str = "champion"
    model_poll_interval_s: float = 5.0
    max_batch_rows: int = 1000
    serve_max_batch_size: int = 64
    # No waiting for a batch to fill: under load, requests queue while the previous batch runs
    # and join the next one anyway; at low load a wait only adds latency (a 5 ms wait capped
    # one connection at 118 req/s, see benchmarks/README.md).
    serve_batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    serve_torch_threads: int = Field(default=1, ge=1)
    # The ingress deployment's autoscaling bounds. One replica per core is the useful scale on a
    # small machine; two or more keep answering when a replica or its node is lost.
    serve_min_replicas: int = Field(default=1, ge=1)
    serve_max_replicas: int = Field(default=2, ge=1)
    # Serve's HAProxy ingress instead of its Python proxy actor, with Serve's throughput
    # settings (uvloop, no per-request actor hop through the proxy): about 3x the requests per
    # second on 2 cores (benchmarks/README.md).
    serve_haproxy: bool = True
    # Ray's default of 4 threads contends with the replicas on small machines: on 2 cores one
    # thread gave 1,790 req/s against 1,460 (benchmarks/README.md).
    serve_haproxy_threads: int = Field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) // 2)), ge=1)
    # Serve's access-log lines are written this many at a time. Ray's throughput profile buffers
    # 1,000, and formatting them at once stalled the replica's event loop for ~20 ms (the p99 of
    # single-row requests went from 24 ms to 5 ms with 50).
    serve_access_log_buffer_lines: int = Field(default=50, ge=1)
    serve_haproxy_stats_port: int = 8404
    serve_haproxy_metrics_port: int = 9101
    # Serve's Python proxy behind HAProxy, for what HAProxy does not route itself.
    serve_fallback_proxy_port: int = 8500
    serve_fallback_proxy_grpc_port: int = 9500
    # Each ingress replica listens on its own port, which HAProxy balances across: HTTP ports
    # come from [base, base + count), the replicas' gRPC ports from the block after it.
    serve_replica_port_base: int = Field(default=30000, ge=1024, le=63000)
    serve_replica_port_count: int = Field(default=1000, ge=4, le=1000)

    # Asynchronous training (off unless both are set): job records in PostgreSQL, requests on
    # RabbitMQ. URLs may carry passwords, hence secrets without defaults.
    database_url: SecretStr | None = None  # postgresql://user@host:5432/db
    amqp_url: SecretStr | None = None  # amqp://user:password@host:5672/%2F
    training_exchange: str = "training"
    training_queue: str = "training.requests"
    training_dead_letter_queue: str = "training.requests.dead"
    # Training jobs one dispatcher runs at once (its RabbitMQ prefetch).
    dispatcher_concurrency: int = Field(default=1, ge=1)
    dispatcher_max_attempts: int = Field(default=3, ge=1)
    dispatcher_backoff_base_s: float = Field(default=5.0, gt=0)
    dispatcher_backoff_max_s: float = Field(default=300.0, gt=0)
    dispatcher_poll_interval_s: float = Field(default=2.0, gt=0)
    # A job whose follower has not written a heartbeat for this long is handed to another dispatcher.
    dispatcher_heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    # How long a running Ray job may be unreachable before its attempt counts as failed.
    dispatcher_ray_unreachable_s: float = Field(default=60.0, gt=0)
    dispatcher_host: str = "127.0.0.1"
    dispatcher_metrics_port: int = 9102

    # Feedback and live accuracy (needs DATABASE_URL). Predictions are written to PostgreSQL in
    # batches, at most this long after their response went out.
    prediction_flush_interval_s: float = Field(default=0.2, gt=0)
    prediction_buffer_rows: int = Field(default=100_000, ge=1)
    # Feedback for a prediction older than this is refused (422).
    feedback_max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)
    # Live accuracy: feedback of the last window, per model version, published once at least
    # `accuracy_min_feedback` labels are in the window; the alert fires below the threshold.
    accuracy_window_s: float = Field(default=3600.0, gt=0)
    accuracy_min_feedback: int = Field(default=50, ge=1)
    accuracy_threshold: float = Field(default=0.8, ge=0, le=1)
    accuracy_refresh_s: float = Field(default=15.0, gt=0)
    # What the accuracy alert's webhook enqueues.
    retrain_kind: Literal["train", "tune"] = "train"
    retrain_config: str = "adult"
    retrain_overrides: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Bearer token Alertmanager presents to the webhook; the webhook is off without one.
    alert_webhook_token: SecretStr | None = None

    # Telemetry. Traces go over OTLP/HTTP to this endpoint (the collector or Tempo, e.g.
    # http://otel-collector:4318); unset, spans are neither recorded nor exported.
    otel_exporter_otlp_endpoint: str | None = None
    otel_traces_sampler_ratio: float = Field(default=1.0, ge=0, le=1)
    log_level: str = "INFO"
    # The W3C traceparent a Ray job continues (set by the dispatcher in the job's environment).
    traceparent: str | None = None
    # Prometheus and Alertmanager (Debian binaries), started by `cluster up` when installed.
    prometheus_enabled: bool = True
    prometheus_host: str = "127.0.0.1"
    prometheus_port: int = 9090
    prometheus_scrape_interval_s: float = Field(default=15.0, gt=0)
    prometheus_rules_dir: Path = REPO_ROOT / "cluster" / "prometheus" / "rules"
    alertmanager_port: int = 9093
    # How long Alertmanager gathers alerts of a group before its first notification.
    alertmanager_group_wait_s: float = Field(default=30.0, ge=0)
    # Exporters scraped when they listen: RabbitMQ's prometheus plugin, prometheus-postgres-exporter
    # (started by `cluster up` when installed and DATABASE_URL is set).
    rabbitmq_metrics_port: int = 15692
    postgres_exporter_port: int = 9187
    # Grafana for the Ray dashboard's embedded charts (compose runs one; none locally).
    grafana_url: str | None = None

    # Nginx: the one entry point (TLS termination, auth for the operator UIs, rate limits).
    # `cluster up` runs it when the Debian package is installed; the tests go through it.
    nginx_enabled: bool = True
    nginx_host: str = "127.0.0.1"
    nginx_https_port: int = 8443
    nginx_http_port: int = 8080  # redirects to https
    # Public name in certificates and redirects; a certificate for it is generated under
    # state_dir/tls unless both files below are given.
    nginx_server_name: str = "localhost"
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Serve ingress endpoints Nginx balances across (host:port); default the local Serve proxy.
    nginx_serve_upstreams: list[str] = Field(default_factory=list)
    # Nginx's connection counters (stub_status) on loopback, read by prometheus-nginx-exporter.
    nginx_status_port: int = 8081
    nginx_exporter_port: int = 9113
    # Requests per second per API key (and per client address without one) on the inference API,
    # with this much burst; beyond it, 429.
    api_rate_limit_rps: int = Field(default=500, ge=1)
    api_rate_limit_burst: int = Field(default=1000, ge=0)
    # Largest request body the inference API accepts (nginx size syntax); 1,000 rows are ~400 KB.
    api_max_body_size: str = "2m"
    # MLflow's UI and API behind Nginx need these (basic auth); without a password the route is closed.
    mlflow_basic_auth_user: str = "mlflow"
    mlflow_basic_auth_password: SecretStr | None = None
    # Ray token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) for the whole cluster: GCS,
    # dashboard, Jobs API. Without a token the dashboard is not routed through Nginx at all.
    ray_auth_token: SecretStr | None = None

    # Gradio UI (`python -m ui`). It reaches the inference API over HTTP only, with its own key;
    # `cluster up` hands it the first of API_KEYS when UI_API_KEY is unset.
    ui_host: str = "127.0.0.1"
    ui_port: int = 7860
    # Public path prefix, for a proxy that sends no X-Forwarded-Prefix. Nginx sends one: leave
    # this empty there, and the same process still answers correctly when reached directly.
    ui_root_path: str = ""
    ui_api_url: str | None = None  # default: serve_url
    ui_api_key: SecretStr | None = None
    ui_username: str = "admin"
    ui_password: SecretStr | None = None  # the UI's login is on whenever this is set
    ui_request_timeout_s: float = Field(default=30.0, gt=0)
    # Anywhere but "development" the UI refuses to start without UI_PASSWORD (compose sets it too).
    deployment_environment: str = "development"

    @model_validator(mode="after")
    def _local_tracking_server(self) -> Settings:
        if not self.mlflow_tracking_uri:
            self.mlflow_tracking_uri = self.mlflow_url
        return self

    @field_validator(
        "database_url",
        "amqp_url",
        "alert_webhook_token",
        "otel_exporter_otlp_endpoint",
        "grafana_url",
        "mlflow_basic_auth_password",
        "ray_auth_token",
        "tls_cert_file",
        "tls_key_file",
        "ui_api_url",
        "ui_api_key",
        "ui_password",
        mode="before",
    )
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `DATABASE_URL=` in a .env or the environment switches the feature off explicitly.
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("state_dir", "serve_config_path", "prometheus_rules_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value if value.is_absolute() else (REPO_ROOT / value).resolve()

    # Derived values -----------------------------------------------------------------------

    @property
    def ray_gcs_address(self) -> str:
        return f"{self.ray_host}:{self.ray_gcs_port}"

    @property
    def ray_dashboard_url(self) -> str:
        return f"http://{self.ray_dashboard_host}:{self.ray_dashboard_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.serve_host}:{self.serve_port}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{self.mlflow_host}:{self.mlflow_port}"

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def resolved_backend_store_uri(self) -> str:
        if self.mlflow_backend_store_uri:
            return self.mlflow_backend_store_uri
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def resolved_artifacts_destination(self) -> str:
        if self.mlflow_artifacts_destination:
            return self.mlflow_artifacts_destination
        if self.s3_bucket:
            return f"s3://{self.s3_bucket}/mlflow"
        return str(self.state_dir / "mlartifacts")

    @property
    def resolved_storage_path(self) -> str:
        return self.ray_storage_path or str(self.state_dir / "ray_results")

    @property
    def training_jobs_enabled(self) -> bool:
        return self.database_url is not None and self.amqp_url is not None

    @property
    def dispatcher_url(self) -> str:
        return f"http://{self.dispatcher_host}:{self.dispatcher_metrics_port}"

    @property
    def feedback_enabled(self) -> bool:
        return self.database_url is not None

    @property
    def tracing_enabled(self) -> bool:
        return self.otel_exporter_otlp_endpoint is not None

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.prometheus_host}:{self.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.prometheus_host}:{self.alertmanager_port}"

    @property
    def edge_url(self) -> str:
        """What users reach: Nginx over https (the port is left out when it is 443)."""
        port = "" if self.nginx_https_port == 443 else f":{self.nginx_https_port}"
        return f"https://{self.nginx_server_name}{port}"

    @property
    def ray_auth_enabled(self) -> bool:
        return self.ray_auth_token is not None

    def ray_auth_headers(self) -> dict[str, str]:
        """What a client of the dashboard and Jobs API sends when token authentication is on."""
        if self.ray_auth_token is None:
            return {}
        return {"Authorization": f"Bearer {self.ray_auth_token.get_secret_value()}"}

    @property
    def ui_url(self) -> str:
        # A wildcard bind is reached over loopback from this machine.
        host = "127.0.0.1" if self.ui_host in {"0.0.0.0", "::", ""} else self.ui_host
        return f"http://{host}:{self.ui_port}"

    @property
    def resolved_ui_api_url(self) -> str:
        return (self.ui_api_url or self.serve_url).rstrip("/")

    @property
    def ui_login_required(self) -> bool:
        return self.deployment_environment.strip().lower() != "development"

    @property
    def resolved_ray_temp_dir(self) -> Path:
        return self.ray_temp_dir or Path("/tmp/ray")

    def api_key_list(self) -> list[str]:
        if self.api_keys is None:
            return []
        return [k.strip() for k in self.api_keys.get_secret_value().split(",") if k.strip()]

    def s3_client_kwargs(self) -> dict[str, str]:
        kwargs: dict[str, str] = {"region_name": self.s3_region}
        if self.s3_endpoint_url:
            kwargs["endpoint_url"] = self.s3_endpoint_url
        if self.aws_access_key_id is not None:
            kwargs["aws_access_key_id"] = self.aws_access_key_id.get_secret_value()
        if self.aws_secret_access_key is not None:
            kwargs["aws_secret_access_key"] = self.aws_secret_access_key.get_secret_value()
        return kwargs

    def s3_environment(self) -> dict[str, str]:
        """The variables that boto3 inside MLflow's server and clients read."""
        env: dict[str, str] = {}
        if self.s3_endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3_endpoint_url
        if self.aws_access_key_id is not None:
            env["AWS_ACCESS_KEY_ID"] = self.aws_access_key_id.get_secret_value()
        if self.aws_secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = self.aws_secret_access_key.get_secret_value()
        env["AWS_DEFAULT_REGION"] = self.s3_region
        return env

    def serve_environment(self) -> dict[str, str]:
        """Ray Serve's ingress mode, read by the Serve controller and replicas at start."""
        if not self.serve_haproxy:
            return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
        base, count = self.serve_replica_port_base, self.serve_replica_port_count
        # Under Ray's temp dir, which is short: HAProxy's unix sockets must fit in 108 bytes.
        haproxy = self.resolved_ray_temp_dir / "haproxy"
        return {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            # Serve's throughput profile: direct ingress into the replicas, uvloop, buffered
            # access logs, user code on the replica's own event loop.
            "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(base),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(base + count - 1),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(base + count),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(base + 2 * count - 1),
            # Per stack, so two stacks on one machine (tests, benchmarks) never share HAProxy.
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
            "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(haproxy / "metrics.sock"),
            "RAY_SERVE_HAPROXY_NBTHREAD": str(self.serve_haproxy_threads),
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": str(self.serve_access_log_buffer_lines),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(self.serve_haproxy_stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(self.serve_haproxy_metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(self.serve_fallback_proxy_port),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(self.serve_fallback_proxy_grpc_port),
        }


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
