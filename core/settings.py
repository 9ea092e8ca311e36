"""The platform's one typed settings object, read from the environment and `.env`.

Settings are grouped by component, one group per prefix of their environment variables:
`settings.ray.gcs_port` is `RAY_GCS_PORT`, `settings.database.url` is `DATABASE_URL`. A process
builds them once at its entry point (`get_settings()`) and hands them down.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


def _blank_is_unset(value: object) -> object:
    # `DATABASE_URL=` in a .env or the environment switches the feature off explicitly.
    return None if isinstance(value, str) and not value.strip() else value


def _in_repo(value: Path) -> Path:
    return value if value.is_absolute() else (REPO_ROOT / value).resolve()


Unset = BeforeValidator(_blank_is_unset)
OptionalSecret = Annotated[SecretStr | None, Unset]
OptionalText = Annotated[str | None, Unset]
OptionalPath = Annotated[Path | None, Unset]
RepoPath = Annotated[Path, AfterValidator(_in_repo)]


def is_loopback(host: str) -> bool:
    """Whether an address (a host setting, or where a socket is bound) reaches this machine only."""
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # A dual-stack socket reports an IPv4 bind as ::ffff:a.b.c.d.
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


class Group(BaseModel):
    """The variables of one component: `<GROUP>_<FIELD>` in the environment. Other variables with
    the same prefix (Ray's own `RAY_*`, say) are not ours and are ignored."""

    model_config = ConfigDict(extra="ignore")


class RaySettings(Group):
    # Ray head. 6379 belongs to Redis on the dev machines, hence 6380. On loopback every Ray port
    # stays on this machine; a head that other machines join needs its private address here.
    host: str = "127.0.0.1"
    # Address drivers connect to; unset means a running local cluster, else a fresh local one.
    address: str | None = None
    gcs_port: int = 6380
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8265
    client_port: int = 10001
    # The head's HTTP agent (Jobs API back end); fixed so that Prometheus and firewalls can name it.
    dashboard_agent_port: int = 52365
    metrics_export_port: int = 8090
    # The head's autoscaler and dashboard serve their own metrics (Ray's defaults). Set, not left to
    # Ray: a port already taken when the head starts leaves that server off without failing the start.
    autoscaler_metrics_port: int = 44217
    dashboard_metrics_port: int = 44227
    # Logical CPUs the head advertises. Training workers and Ray Data tasks mostly wait on each
    # other, so advertising more than the physical cores avoids resource deadlocks on small boxes.
    num_cpus: int = Field(default_factory=lambda: max(4, 2 * (os.cpu_count() or 1)))
    # Short temp dir: Ray's unix sockets must fit in 107 characters.
    temp_dir: OptionalPath = None
    # Where Ray Train and Tune keep checkpoints and results; a shared URI (s3://...) once there
    # are several nodes (`resolved_storage_path`).
    storage_path: str | None = None
    # Ray token authentication (RAY_AUTH_MODE=token, Ray >= 2.52) for the whole cluster: GCS,
    # dashboard, Jobs API. Without a token the dashboard is not routed through Nginx at all.
    auth_token: OptionalSecret = None

    @property
    def gcs_address(self) -> str:
        return f"{self.host}:{self.gcs_port}"

    @property
    def local_only(self) -> bool:
        """A head on loopback: a cluster of this machine, that no other machine can join."""
        return is_loopback(self.host)

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.dashboard_host}:{self.dashboard_port}"

    @property
    def resolved_temp_dir(self) -> Path:
        return self.temp_dir or Path("/tmp/ray")

    @property
    def auth_enabled(self) -> bool:
        return self.auth_token is not None

    def auth_headers(self) -> dict[str, str]:
        """What a client of the dashboard and Jobs API sends when token authentication is on."""
        if self.auth_token is None:
            return {}
        return {"Authorization": f"Bearer {self.auth_token.get_secret_value()}"}


class ServeSettings(Group):
    """Ray Serve: where it listens, and every knob of the inference deployment (the Serve config
    `cluster up` deploys is rendered from these: serve_apps/app.py)."""

    host: str = "127.0.0.1"
    port: int = 8000
    config_path: RepoPath = REPO_ROOT / "serve_apps" / "config.yaml"
    max_batch_size: int = Field(default=64, ge=1)
    # No waiting for a batch to fill: under load, requests queue while the previous batch runs
    # and join the next one anyway; at low load a wait only adds latency (benchmarks/README.md).
    batch_wait_timeout_s: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=1, ge=1)
    # The ingress deployment's autoscaling bounds. One replica per core is the useful scale on a
    # small machine; two or more keep answering when a replica or its node is lost.
    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=2, ge=1)
    # Requests one replica takes at once before Serve queues them elsewhere.
    max_ongoing_requests: int = Field(default=256, ge=1)
    # Serve's HAProxy ingress instead of its Python proxy actor, with Serve's throughput settings
    # (uvloop, no per-request actor hop through the proxy); measured in benchmarks/README.md.
    haproxy: bool = True
    # Ray's default of 4 threads contends with the replicas on small machines (benchmarks/README.md).
    haproxy_threads: int = Field(default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) // 2)), ge=1)
    # Serve's access-log lines are written this many at a time. Ray's throughput profile buffers
    # 1,000, and formatting them at once stalls the replica's event loop (benchmarks/README.md).
    access_log_buffer_lines: int = Field(default=50, ge=1)
    haproxy_stats_port: int = 8404
    haproxy_metrics_port: int = 9101
    # Serve's Python proxy behind HAProxy, for what HAProxy does not route itself.
    fallback_proxy_port: int = 8500
    fallback_proxy_grpc_port: int = 9500
    # Each ingress replica listens on its own port, which HAProxy balances across: HTTP ports
    # come from [base, base + count), the replicas' gRPC ports from the block after it.
    replica_port_base: int = Field(default=30000, ge=1024, le=63000)
    replica_port_count: int = Field(default=1000, ge=4, le=1000)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class ModelSettings(Group):
    # The default model: the one /v1/predict and /v1/models/current answer with. Every other
    # registered model with a champion alias is served at /v1/models/{name}/predict. Training never
    # reads it: a job registers under its config's `name` (or `model_name`).
    name: str = "adult-income"
    # How often each replica looks at the champion alias of each model it serves.
    poll_interval_s: float = Field(default=5.0, gt=0)
    # Models one replica keeps loaded, the default included; the least recently used other one
    # makes room for a new one and loads again on its next request.
    max_served: int = Field(default=16, ge=1)


class MlflowSettings(Group):
    """The MLflow tracking server and the clients that talk to it."""

    host: str = "127.0.0.1"
    port: int = 5000
    # Default: the server `cluster up` starts, at host:port (so moving the port moves both).
    tracking_uri: str = ""
    backend_store_uri: str | None = None  # default: SQLite under state_dir
    artifacts_destination: str | None = None  # default: S3 bucket if set, else state_dir
    experiment: str = "adult-income"
    workers: int = 2
    # MLflow's UI and API behind Nginx need these (basic auth); without a password the route is closed.
    basic_auth_user: str = "mlflow"
    basic_auth_password: OptionalSecret = None

    @model_validator(mode="after")
    def _local_tracking_server(self) -> MlflowSettings:
        if not self.tracking_uri:
            self.tracking_uri = self.url
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class S3Settings(Group):
    """The object store (MinIO in compose, any S3-compatible server elsewhere)."""

    endpoint_url: str | None = None
    bucket: str | None = None
    region: str = "us-east-1"


class AwsSettings(Group):
    access_key_id: OptionalSecret = None
    secret_access_key: OptionalSecret = None


class ApiSettings(Group):
    """The inference API's keys and the edge's limits on it."""

    keys: OptionalSecret = None  # comma-separated; no default on purpose
    # How often each ingress replica re-reads the key table (`python -m cluster keys`, needs
    # DATABASE_URL): an added key is accepted, a revoked one refused, within this many seconds.
    key_refresh_s: float = Field(default=5.0, gt=0)
    # Requests per second per API key (and per client address without one) on the inference API,
    # with this much burst; beyond it, 429.
    rate_limit_rps: int = Field(default=500, ge=1)
    rate_limit_burst: int = Field(default=1000, ge=0)
    # Largest request body the inference API accepts (nginx size syntax): room for MAX_BATCH_ROWS rows.
    max_body_size: str = "2m"

    def key_list(self) -> list[str]:
        if self.keys is None:
            return []
        return [k.strip() for k in self.keys.get_secret_value().split(",") if k.strip()]


class UrlSettings(Group):
    """A connection URL; it may carry a password, hence a secret without a default."""

    url: OptionalSecret = None

    def value(self) -> str | None:
        return None if self.url is None else self.url.get_secret_value()


class TrainingQueueSettings(Group):
    exchange: str = "training"
    queue: str = "training.requests"
    dead_letter_queue: str = "training.requests.dead"
    # Per API key: jobs queued or running at once, and jobs started in any hour; beyond either the
    # API answers 429 with Retry-After. Jobs of the alert webhook and of operators count against no key.
    max_active_per_key: int = Field(default=2, ge=1)
    max_per_hour_per_key: int = Field(default=10, ge=1)
    # Inside a Ray job the dispatcher started: the training job it runs for (TRAINING_JOB_ID). A
    # rollout of the job's candidate reports its decisions to that job's history.
    job_id: str | None = None


class DispatcherSettings(Group):
    # Training jobs one dispatcher runs at once (its RabbitMQ prefetch).
    concurrency: int = Field(default=1, ge=1)
    max_attempts: int = Field(default=3, ge=1)
    backoff_base_s: float = Field(default=5.0, gt=0)
    backoff_max_s: float = Field(default=300.0, gt=0)
    poll_interval_s: float = Field(default=2.0, gt=0)
    # A job whose follower has not written a heartbeat for this long is handed to another dispatcher.
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    # How long a running Ray job may be unreachable before its attempt counts as failed.
    ray_unreachable_s: float = Field(default=60.0, gt=0)
    # Longest an attempt may take from its submission to Ray (time waiting for resources counts)
    # before it ends as timed_out and its Ray job is stopped; per kind, as tuning runs many trials.
    max_wall_time_train_s: float = Field(default=7200.0, gt=0)
    max_wall_time_tune_s: float = Field(default=21600.0, gt=0)
    host: str = "127.0.0.1"
    metrics_port: int = 9102

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}"


def _dataset_prefix(value: str) -> str:
    # Always a whole folder, so that `datasets` cannot also admit `datasets-private/`.
    stripped = value.strip().strip("/")
    return f"{stripped}/" if stripped else ""


class JobLimitsSettings(Group):
    """What a training request sent without an admin key may ask for
    (services/training_jobs/admission.py). Admins skip the caps, never the cluster's own size."""

    # Train workers of one job, or of one tuning trial (tune.trial_workers).
    max_workers: int = Field(default=8, ge=1)
    max_cpus_per_worker: float = Field(default=4.0, gt=0)
    # Epochs one training run or one trial may run: the request's wall-clock budget.
    max_epochs: int = Field(default=200, ge=1)
    max_tune_samples: int = Field(default=64, ge=1)
    max_concurrent_trials: int = Field(default=8, ge=1)
    # CPUs a job can never get because the platform's own actors hold them for good (the Serve
    # ingress replicas that SERVE_MIN_REPLICAS keeps): a job that needs them would wait forever.
    reserved_cpus: float = Field(default=0.5, ge=0)
    # Data sets in the object store live under s3://<S3_BUCKET>/<this prefix>, where
    # `python -m jobs.data push` writes them; no other key of the bucket may be read by a request.
    dataset_prefix: Annotated[str, AfterValidator(_dataset_prefix)] = "datasets/"


class BatchSettings(Group):
    """Batch inference jobs (`python -m jobs.batch_predict`, docs/batch-inference.md)."""

    # The only folder a batch job reads and writes local files in; a relative input or output is
    # taken against it. Unset: $STATE_DIR/batch. Give an absolute path: a relative one is taken
    # against the repository, and a Ray job runs in a copy of it that goes away with the job.
    data_dir: OptionalPath = None
    # The only buckets an s3:// input or output may name, comma-separated. Unset: S3_BUCKET alone.
    buckets: OptionalText = None
    # Scoring actors a job starts (each loads the model once) and the CPUs each reserves; reads and
    # writes reserve none, so that the actors can take every CPU of a small cluster without starving them.
    actors: int = Field(default=2, ge=1)
    cpus_per_actor: float = Field(default=1.0, gt=0)
    # What a request without the admin scope may ask for in `actors`.
    max_actors: int = Field(default=8, ge=1)
    # Rows per model call in an actor: its memory besides the model is a few of these batches.
    batch_size: int = Field(default=16384, ge=1)
    # Ray Data's largest block (MiB), and the size of a read task's piece of the input. Ray Data
    # shares a job's object store budget among its read, scoring and write stages, and a stage
    # runs only as many tasks as its share holds blocks: small blocks keep both actors busy in a
    # small object store.
    block_size_mb: int = Field(default=8, ge=1)
    # The object store memory one job's Ray Data pipeline may hold at once (MiB); beyond it the
    # reads wait. Unset: Ray Data's default share of the cluster's object store.
    object_store_limit_mb: Annotated[int | None, Unset] = Field(default=None, ge=1)
    # Read and write tasks running at once; they reserve no CPU, so this is what bounds them.
    io_concurrency: int = Field(default=2, ge=1)
    # Output rows are gathered into Parquet files of at least this much data in memory (MiB; the
    # files on disk are smaller, compressed). The rows wait in the object store until a file is
    # full: more than the write stage's share of the budget, and the job stalls.
    file_size_mb: int = Field(default=4, ge=1)
    # Longest one attempt of a batch job from the training-jobs API may take (seconds); then it
    # ends as timed_out and its Ray job is stopped.
    max_wall_time_s: float = Field(default=7200.0, gt=0)


class PredictionSettings(Group):
    # Predictions are written to PostgreSQL in batches, at most this long after their response went out.
    flush_interval_s: float = Field(default=0.2, gt=0)
    buffer_rows: int = Field(default=100_000, ge=1)
    # Recorded predictions (and their feedback) older than this are deleted by the monitor, so the
    # table stays bounded; a label sent for a deleted prediction is refused as unknown.
    retention_s: float = Field(default=30 * 24 * 3600.0, gt=0)


class FeedbackSettings(Group):
    # Feedback for a prediction older than this is refused (422).
    max_age_s: float = Field(default=7 * 24 * 3600.0, gt=0)


class AccuracySettings(Group):
    """Live accuracy: feedback of the last window, per model version, published once at least
    `min_feedback` labels are in the window; the alert fires below the threshold."""

    window_s: float = Field(default=3600.0, gt=0)
    min_feedback: int = Field(default=50, ge=1)
    threshold: float = Field(default=0.8, ge=0, le=1)
    refresh_s: float = Field(default=15.0, gt=0)


class MonitorSettings(Group):
    """Drift and estimated accuracy of every served version, from its recorded predictions of the
    last `window_s` (at most the `max_rows` most recent), judged against the reference profile its
    training logged once `min_rows` are in the window. Statistical tests and thresholds:
    docs/monitoring.md."""

    enabled: bool = True
    refresh_s: float = Field(default=30.0, gt=0)
    window_s: float = Field(default=3600.0, gt=0)
    min_rows: int = Field(default=200, ge=1)
    max_rows: int = Field(default=5000, ge=1)
    # Up to this many rows on the smaller side, a feature is judged by a test's p-value (KS,
    # chi-square); above it by a distance (Wasserstein, Jensen-Shannon), which large samples need.
    small_sample_rows: int = Field(default=1000, ge=1)
    p_value: float = Field(default=0.05, gt=0, lt=1)
    wasserstein_threshold: float = Field(default=0.1, gt=0)
    jensen_shannon_threshold: float = Field(default=0.1, gt=0, le=1)
    # ModelDataDrift: at least this share of the features drifted, for `drift_alert_for_s`.
    drift_share_threshold: float = Field(default=0.5, gt=0, le=1)
    drift_alert_for_s: float = Field(default=600.0, ge=0)
    # ModelEstimatedAccuracyLow: estimated accuracy below the reference by more than this.
    estimated_accuracy_max_drop: float = Field(default=0.05, gt=0, lt=1)
    estimated_accuracy_alert_for_s: float = Field(default=600.0, ge=0)


class RolloutSettings(Group):
    """Shadow and canary rollouts and the service that owns them (services/rollout, run by the
    dispatcher). A job config's `promotion.rollout` chooses the mode; the window and the rule below
    apply where the config leaves them unset. The rule: docs/rollout.md."""

    enabled: bool = True
    refresh_s: float = Field(default=5.0, gt=0)
    # A shadow window or canary step ends after this many mirrored requests, or this long.
    window_requests: int = Field(default=1000, ge=1)
    window_s: float = Field(default=3600.0, gt=0)
    # Fewer paired rows than this when a window ends: nothing to judge by, so the candidate is rejected.
    min_rows: int = Field(default=200, ge=1)
    # Without `min_labels` labelled paired rows, the candidate must agree with the champion this often.
    min_agreement: float = Field(default=0.9, ge=0, le=1)
    min_labels: int = Field(default=50, ge=1)
    # With them, its accuracy on the same rows may be at most this much below the champion's.
    max_accuracy_drop: float = Field(default=0.02, ge=0, le=1)
    # ... and by enough that chance does not explain it at this one-sided confidence (0.5: any drop).
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    # Two regression outputs agree when they differ by at most this share of the champion's value.
    regression_tolerance: float = Field(default=0.1, ge=0)
    # Mirrored requests waiting to be scored by the other version, per replica; more are dropped
    # (and counted) rather than queued: the shadow path never holds memory or the client's answer.
    shadow_queue_requests: int = Field(default=256, ge=1)
    shadow_batch_rows: int = Field(default=256, ge=1)
    # What the canary's stable hash is over: the API key's id, the request id, or a request header
    # (`header:X-User-Id`; requests without it fall back to the API key's id).
    canary_key: str = Field(default="api_key", pattern=r"^(api_key|request_id|header:[A-Za-z0-9-]+)$")


class ProbationSettings(Group):
    """After any promotion the new champion is on probation for `window_s`: when its live accuracy
    (or, without enough labels, its estimated accuracy) falls below the previous champion's over
    its last window of the same length by more than `max_drop`, the alias goes back."""

    enabled: bool = True
    window_s: float = Field(default=3600.0, gt=0)
    min_labels: int = Field(default=50, ge=1)
    min_rows: int = Field(default=200, ge=1)
    max_drop: float = Field(default=0.02, ge=0, le=1)
    use_estimate: bool = True
    # A drop counts when chance does not explain it at this one-sided confidence (0.5: any drop).
    confidence: float = Field(default=0.95, ge=0.5, lt=1)
    # ModelRolledBack stays firing this long after a rollback.
    alert_s: float = Field(default=3600.0, gt=0)


class RetrainSettings(Group):
    """What the accuracy alert's webhook enqueues."""

    kind: Literal["train", "tune"] = "train"
    # Model name -> config name in jobs/configs, for a model that more than one config trains; any
    # other model is retrained by the one config that trains it (services/training_jobs/retrain.py).
    configs: dict[str, str] = Field(default_factory=dict)
    overrides: dict[str, str | int | float | bool] = Field(default_factory=dict)
    # Jobs queued by an alert add the labelled feedback to their training data (`feedback.enabled`).
    use_feedback: bool = True
    # Jobs of the alerts that fire before any label (drift, estimated accuracy) wait this long at
    # most for the config's `feedback.min_rows` new labels (`feedback.wait_s`).
    feedback_wait_s: float = Field(default=24 * 3600.0, ge=0, le=30 * 24 * 3600)


class AlertSettings(Group):
    # Bearer token Alertmanager presents to the webhook; the webhook is off without one.
    webhook_token: OptionalSecret = None


class OtelSettings(Group):
    # Traces go over OTLP/HTTP to this endpoint (the collector or Tempo, e.g.
    # http://otel-collector:4318); unset, spans are neither recorded nor exported.
    exporter_otlp_endpoint: OptionalText = None
    traces_sampler_ratio: float = Field(default=1.0, ge=0, le=1)


class PrometheusSettings(Group):
    """Prometheus (a Debian binary), started by `cluster up` when installed."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9090
    scrape_interval_s: float = Field(default=15.0, gt=0)
    rules_dir: RepoPath = REPO_ROOT / "cluster" / "prometheus" / "rules"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class AlertmanagerSettings(Group):
    port: int = 9093
    # How long Alertmanager gathers alerts of a group before its first notification.
    group_wait_s: float = Field(default=30.0, ge=0)


class RabbitmqSettings(Group):
    # RabbitMQ's prometheus plugin, scraped when it listens.
    metrics_port: int = 15692


class PostgresSettings(Group):
    # prometheus-postgres-exporter, started by `cluster up` when installed and DATABASE_URL is set.
    exporter_port: int = 9187


class GrafanaSettings(Group):
    # Grafana for the Ray dashboard's embedded charts (compose runs one; none locally).
    url: OptionalText = None


class NginxSettings(Group):
    """Nginx: the one entry point (TLS termination, auth for the operator UIs, rate limits).
    `cluster up` runs it when the Debian package is installed; the tests go through it."""

    enabled: bool = True
    host: str = "127.0.0.1"
    https_port: int = 8443
    http_port: int = 8080  # redirects to https
    # Public name in certificates and redirects; a certificate for it is generated under
    # state_dir/tls unless TLS_CERT_FILE and TLS_KEY_FILE are given.
    server_name: str = "localhost"
    # Serve ingress endpoints Nginx balances across (host:port); default the local Serve proxy.
    serve_upstreams: list[str] = Field(default_factory=list)
    # Nginx's connection counters (stub_status) on loopback, read by prometheus-nginx-exporter.
    status_port: int = 8081
    exporter_port: int = 9113

    @property
    def edge_url(self) -> str:
        """What users reach: Nginx over https (the port is left out when it is 443)."""
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return f"https://{self.server_name}{port}"


class TlsSettings(Group):
    cert_file: OptionalPath = None
    key_file: OptionalPath = None


class UiSettings(Group):
    """The Gradio UI (`python -m ui`). It reaches the inference API over HTTP only, with its own
    key: UI_API_KEY, used as it is. Unset, `cluster up` gives the UI a key with only the scopes it
    uses (predict, feedback, train; never admin) where DATABASE_URL is set: registered as
    `ui-<UTC time>` and kept in `state_dir/ui.key` (mode 0600), reused while the table lists it as
    active, replaced (the old one revoked) once it is not. Without a database, or while PostgreSQL
    cannot be reached, the UI gets the first of API_KEYS, an admin key, with a warning."""

    host: str = "127.0.0.1"
    port: int = 7860
    # Public path prefix, for a proxy that sends no X-Forwarded-Prefix. Nginx sends one: leave
    # this empty there, and the same process still answers correctly when reached directly.
    root_path: str = ""
    api_url: OptionalText = None  # default: the Serve URL
    api_key: OptionalSecret = None
    username: str = "admin"
    password: OptionalSecret = None  # the UI's login is on whenever this is set
    request_timeout_s: float = Field(default=30.0, gt=0)

    @property
    def url(self) -> str:
        # A wildcard bind is reached over loopback from this machine.
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::", ""} else self.host
        return f"http://{host}:{self.port}"


class Settings(BaseSettings):
    """Every knob of the platform.

    Embedded defaults run the whole stack on a bare machine (MLflow on SQLite, artifacts on local
    disk, the shipped data set). Secrets have no defaults.
    """

    # The repository's .env, then one in the working directory (which wins), so the CLI reads the
    # same values wherever it is started from. `RAY_GCS_PORT` fills `ray.gcs_port`: the first `_`
    # separates the group from its field.
    model_config = SettingsConfigDict(
        env_file=(REPO_ROOT / ".env", ".env"),
        env_file_encoding="utf-8",
        extra="ignore",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        nested_model_default_partial_update=True,
    )

    # Where `cluster up` keeps pid files, logs, the SQLite store and local artifacts.
    state_dir: RepoPath = REPO_ROOT / ".state"
    # How long `cluster up` waits for each component to report healthy.
    startup_timeout_s: float = 180.0
    # Recorded on every run; set when the code travels without its .git (containers, Ray jobs).
    git_commit: str | None = None
    log_level: str = "INFO"
    # Also write each process's JSON log lines to <log_dir>/<service>.log, size-bounded and
    # rotated, for a log shipper to tail (compose: the platform-logs volume, read by the
    # OpenTelemetry collector). Unset: stderr only, which `cluster up` already sends to files.
    log_dir: OptionalPath = None
    # The W3C traceparent a Ray job continues (set by the dispatcher in the job's environment).
    traceparent: str | None = None
    # Who started the Ray job (core.audit.Actor as JSON), set by the dispatcher in the job's
    # environment; the training job records it on the model version it registers.
    audit_actor: str | None = None
    # Anywhere but "development" the UI refuses to start without UI_PASSWORD (compose sets it too).
    deployment_environment: str = "development"
    # The registry alias every served model follows.
    champion_alias: str = "champion"
    # Rows one prediction request may carry.
    max_batch_rows: int = Field(default=1000, ge=1)

    ray: RaySettings = Field(default_factory=RaySettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    s3: S3Settings = Field(default_factory=S3Settings)
    aws: AwsSettings = Field(default_factory=AwsSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    # Asynchronous training (off unless both are set): job records, predictions, feedback and API
    # keys in PostgreSQL (postgresql://user@host:5432/db); requests on RabbitMQ (amqp://...).
    database: UrlSettings = Field(default_factory=UrlSettings)
    amqp: UrlSettings = Field(default_factory=UrlSettings)
    training: TrainingQueueSettings = Field(default_factory=TrainingQueueSettings)
    dispatcher: DispatcherSettings = Field(default_factory=DispatcherSettings)
    joblimits: JobLimitsSettings = Field(default_factory=JobLimitsSettings)
    batch: BatchSettings = Field(default_factory=BatchSettings)
    prediction: PredictionSettings = Field(default_factory=PredictionSettings)
    feedback: FeedbackSettings = Field(default_factory=FeedbackSettings)
    accuracy: AccuracySettings = Field(default_factory=AccuracySettings)
    monitor: MonitorSettings = Field(default_factory=MonitorSettings)
    retrain: RetrainSettings = Field(default_factory=RetrainSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    probation: ProbationSettings = Field(default_factory=ProbationSettings)
    alert: AlertSettings = Field(default_factory=AlertSettings)
    otel: OtelSettings = Field(default_factory=OtelSettings)
    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    alertmanager: AlertmanagerSettings = Field(default_factory=AlertmanagerSettings)
    rabbitmq: RabbitmqSettings = Field(default_factory=RabbitmqSettings)
    postgres: PostgresSettings = Field(default_factory=PostgresSettings)
    grafana: GrafanaSettings = Field(default_factory=GrafanaSettings)
    nginx: NginxSettings = Field(default_factory=NginxSettings)
    tls: TlsSettings = Field(default_factory=TlsSettings)
    ui: UiSettings = Field(default_factory=UiSettings)

    # Derived values that span groups ------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def resolved_backend_store_uri(self) -> str:
        if self.mlflow.backend_store_uri:
            return self.mlflow.backend_store_uri
        return f"sqlite:///{self.state_dir / 'mlflow.db'}"

    @property
    def resolved_artifacts_destination(self) -> str:
        if self.mlflow.artifacts_destination:
            return self.mlflow.artifacts_destination
        if self.s3.bucket:
            return f"s3://{self.s3.bucket}/mlflow"
        return str(self.state_dir / "mlartifacts")

    @property
    def resolved_storage_path(self) -> str:
        """Where Ray Train and Tune keep checkpoints and results: RAY_STORAGE_PATH, else the object
        store when S3_BUCKET is set (nothing durable on a node's disk), else the state dir."""
        if self.ray.storage_path:
            return self.ray.storage_path
        if self.s3.bucket:
            return f"s3://{self.s3.bucket}/ray-results"
        return str(self.state_dir / "ray_results")

    @property
    def batch_data_dir(self) -> Path:
        """The folder of batch jobs' local files: BATCH_DATA_DIR, else $STATE_DIR/batch."""
        if self.batch.data_dir is None:
            return self.state_dir / "batch"
        return _in_repo(self.batch.data_dir)

    @property
    def batch_buckets(self) -> list[str]:
        """The buckets batch jobs may read and write: BATCH_BUCKETS, else S3_BUCKET, else none."""
        if self.batch.buckets:
            return [name.strip() for name in self.batch.buckets.split(",") if name.strip()]
        return [self.s3.bucket] if self.s3.bucket else []

    @property
    def training_jobs_enabled(self) -> bool:
        return self.database.url is not None and self.amqp.url is not None

    @property
    def tracing_enabled(self) -> bool:
        return self.otel.exporter_otlp_endpoint is not None

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.prometheus.host}:{self.alertmanager.port}"

    @property
    def resolved_ui_api_url(self) -> str:
        return (self.ui.api_url or self.serve.url).rstrip("/")

    @property
    def ui_login_required(self) -> bool:
        return self.deployment_environment.strip().lower() != "development"

    def s3_client_kwargs(self) -> dict[str, str]:
        kwargs: dict[str, str] = {"region_name": self.s3.region}
        if self.s3.endpoint_url:
            kwargs["endpoint_url"] = self.s3.endpoint_url
        if self.aws.access_key_id is not None:
            kwargs["aws_access_key_id"] = self.aws.access_key_id.get_secret_value()
        if self.aws.secret_access_key is not None:
            kwargs["aws_secret_access_key"] = self.aws.secret_access_key.get_secret_value()
        return kwargs

    def s3_environment(self) -> dict[str, str]:
        """The variables that boto3 inside MLflow's server and clients read."""
        env: dict[str, str] = {}
        if self.s3.endpoint_url:
            env["MLFLOW_S3_ENDPOINT_URL"] = self.s3.endpoint_url
        if self.aws.access_key_id is not None:
            env["AWS_ACCESS_KEY_ID"] = self.aws.access_key_id.get_secret_value()
        if self.aws.secret_access_key is not None:
            env["AWS_SECRET_ACCESS_KEY"] = self.aws.secret_access_key.get_secret_value()
        env["AWS_DEFAULT_REGION"] = self.s3.region
        return env

    def serve_environment(self) -> dict[str, str]:
        """Ray Serve's ingress mode, read by the Serve controller and replicas at start."""
        serve = self.serve
        if not serve.haproxy:
            return {"RAY_SERVE_ENABLE_HA_PROXY": "0"}
        base, count = serve.replica_port_base, serve.replica_port_count
        # Under Ray's temp dir, which is short: HAProxy's unix sockets must fit in 108 bytes.
        haproxy = self.ray.resolved_temp_dir / "haproxy"
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
            "RAY_SERVE_HAPROXY_NBTHREAD": str(serve.haproxy_threads),
            "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": str(serve.access_log_buffer_lines),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(serve.haproxy_stats_port),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(serve.haproxy_metrics_port),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(serve.fallback_proxy_port),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(serve.fallback_proxy_grpc_port),
        }


def environment_variables() -> Iterator[tuple[str, str, Any]]:
    """Every setting as (environment variable, dotted path, field info), in declaration order."""
    for name, field in Settings.model_fields.items():
        group = field.annotation
        if isinstance(group, type) and issubclass(group, Group):
            for leaf, info in group.model_fields.items():
                yield f"{name}_{leaf}".upper(), f"{name}.{leaf}", info
        else:
            yield name.upper(), name, field


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, read once; entry points call it and hand the result down."""
    return Settings()
