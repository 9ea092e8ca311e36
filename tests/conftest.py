"""Shared fixtures: one real stack (Ray head, MLflow on this machine's PostgreSQL, the Serve app)
for the integration and end-to-end tests, started and stopped through `python -m cluster`."""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from benchmarks.otlp_sink import OtlpSink
from benchmarks.stack import BenchStack
from cluster.edge import local_ca_file, local_edge_url, nginx_binary
from cluster.observability import RULES_DIR
from core.settings import REPO_ROOT, get_settings

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
ALERT_WEBHOOK_TOKEN = secrets.token_urlsafe(24)
RAY_AUTH_TOKEN = secrets.token_urlsafe(24)
MLFLOW_PASSWORD = secrets.token_urlsafe(16)
UI_PASSWORD = secrets.token_urlsafe(16)


def pytest_configure(config: pytest.Config) -> None:
    """Token authentication on for every Ray cluster of the session. Ray reads RAY_AUTH_MODE once,
    when this process first imports it (collection does), so it is set before anything else."""
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = RAY_AUTH_TOKEN


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-duration",
        type=float,
        default=30.0,
        help="seconds of steady load in the soak test (`make test-reliability` gives it 600)",
    )
    parser.addoption(
        "--reliability-report",
        default=None,
        help="write the figures the fault, soak and fuzz tests measured to this JSON file",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for kind in ("unit", "integration", "e2e", "reliability", "security"):
            if f"/tests/{kind}/" in str(item.fspath):
                item.add_marker(getattr(pytest.mark, kind))


# Ports the tests hand out come from below the kernel's ephemeral range (32768-60999), where Ray
# picks its own random ports and every outgoing connection takes one, and above Ray's worker port
# range (10002-19999): a port found free here is not taken by someone else before it is used.
TEST_PORTS = range(20000, 30000)
_handed_out: set[int] = set()
# Each stack's Serve replicas take their ports from a block of their own above TEST_PORTS. Blocks
# are drawn at random and checked, so test sessions running side by side do not pick the same one.
REPLICA_PORT_BLOCK = 100
_replica_blocks_handed_out: set[int] = set()


def replica_port_block() -> int:
    blocks = [b for b in range(30000, 32000, REPLICA_PORT_BLOCK) if b not in _replica_blocks_handed_out]
    random.shuffle(blocks)
    for base in blocks:
        if all(_port_is_free(port) for port in range(base, base + REPLICA_PORT_BLOCK)):
            _replica_blocks_handed_out.add(base)
            return base
    raise RuntimeError("no free block of replica ports in 30000-31999")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def serve_ingress_overrides() -> dict[str, str]:
    """Serve's HAProxy ingress of one test stack: its own stats and metrics ports and replica
    port block, so stacks running side by side never collide."""
    return {
        "SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "SERVE_FALLBACK_PROXY_PORT": str(free_port()),
        "SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "SERVE_REPLICA_PORT_BASE": str(replica_port_block()),
        "SERVE_REPLICA_PORT_COUNT": str(REPLICA_PORT_BLOCK),
    }


def reserve_ports(ports: range) -> None:
    """Ports a process takes by itself (a Ray node's worker-port block): free_port never hands them out."""
    _handed_out.update(ports)


def free_port() -> int:
    for _ in range(200):
        port = random.choice(TEST_PORTS)
        if port in _handed_out or not _port_is_free(port):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {TEST_PORTS}")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass(frozen=True)
class Stack(BenchStack):
    """A running stack as the tests reach it: the benchmark's handle (settings, environment, key,
    auth header) plus the API's URL and an HTTP client."""

    @property
    def edge(self) -> bool:
        """Nginx runs in front (the Debian package is installed): users, and these tests, go through it."""
        return nginx_binary(self.settings) is not None

    @property
    def api_url(self) -> str:
        if self.edge:
            return local_edge_url(self.settings)
        return self.settings.serve.url

    @property
    def verify(self) -> bool | str:
        """The local CA `cluster up` issued the edge's certificate from."""
        return str(local_ca_file(self.settings)) if self.edge else True

    @cached_property
    def http(self) -> httpx.Client:
        """The inference API as a user reaches it: over TLS through Nginx."""
        return httpx.Client(base_url=self.api_url, verify=self.verify, timeout=30)


@contextmanager
def temporary_database(prefix: str) -> Iterator[str]:
    """A throwaway database on this machine's PostgreSQL; yields its name, drops it afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield name
    finally:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """MLflow's backend store for the test stack."""
    with temporary_database("mlflow_test") as name:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"


@pytest.fixture(scope="session")
def jobs_database() -> Iterator[str]:
    """A database name for training-job records; `cluster up` creates it, as it would for a user."""
    import psycopg

    name = f"jobs_test_{uuid.uuid4().hex[:8]}"
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def queue_names() -> Iterator[dict[str, str]]:
    """Per-session exchange and queues on this machine's RabbitMQ, deleted afterwards."""
    import asyncio

    import aio_pika

    suffix = uuid.uuid4().hex[:8]
    names = {
        "TRAINING_EXCHANGE": f"training-test-{suffix}",
        "TRAINING_QUEUE": f"training-test-{suffix}.requests",
        "TRAINING_DEAD_LETTER_QUEUE": f"training-test-{suffix}.dead",
    }
    yield names

    async def delete() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (names["TRAINING_QUEUE"], names["TRAINING_DEAD_LETTER_QUEUE"]):
                await channel.queue_delete(queue)
            for exchange in (names["TRAINING_EXCHANGE"], names["TRAINING_EXCHANGE"] + ".dead"):
                await channel.exchange_delete(exchange)

    asyncio.run(delete())


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """What the reliability and security tests measured, by name; written out at the end of the
    session with `--reliability-report PATH` (docs/RELIABILITY.md quotes that file)."""
    collected: dict[str, Any] = {}
    yield collected
    target = request.config.getoption("--reliability-report")
    if target and collected:
        Path(target).write_text(json.dumps(collected, indent=2, sort_keys=True) + "\n", encoding="utf-8")


@pytest.fixture(scope="session")
def otlp_sink() -> Iterator[OtlpSink]:
    """Receives the stack's spans over OTLP/HTTP, as the collector would."""
    sink = OtlpSink().start()
    yield sink
    sink.stop()


def fast_alert_rules(target: Path, for_s: int = 3) -> Path:
    """The shipped rules with short `for:` durations, so a test sees an alert fire in seconds."""
    target.mkdir(parents=True, exist_ok=True)
    for source in RULES_DIR.glob("*.yml"):
        rules = yaml.safe_load(source.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                if "for" in rule:
                    rule["for"] = f"{for_s}s"
        (target / source.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    return target


@pytest.fixture(scope="session")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    pg_database: str,
    jobs_database: str,
    queue_names: dict[str, str],
    otlp_sink: OtlpSink,
) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("stack")
    gcs = free_port()
    api_key = secrets.token_urlsafe(24)
    mlflow_port = free_port()
    overrides = {
        "STATE_DIR": str(state),
        "RAY_GCS_PORT": str(gcs),
        "RAY_DASHBOARD_PORT": str(free_port()),
        "RAY_CLIENT_PORT": str(free_port()),
        "RAY_DASHBOARD_AGENT_PORT": str(free_port()),
        "RAY_METRICS_EXPORT_PORT": str(free_port()),
        "RAY_TEMP_DIR": f"/tmp/rt{gcs}",
        "SERVE_PORT": str(free_port()),
        **serve_ingress_overrides(),
        "MLFLOW_PORT": str(mlflow_port),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
        "MLFLOW_BACKEND_STORE_URI": pg_database,
        "MLFLOW_EXPERIMENT": "tests",
        "API_KEYS": f"{api_key},second-{api_key}",
        "API_KEY_REFRESH_S": "1",
        "MODEL_POLL_INTERVAL_S": "1",
        "MAX_BATCH_ROWS": "50",
        "DATABASE_URL": jobs_database,
        "AMQP_URL": AMQP_URL,
        **queue_names,
        "DISPATCHER_METRICS_PORT": str(free_port()),
        "DISPATCHER_MAX_ATTEMPTS": "2",
        "DISPATCHER_BACKOFF_BASE_S": "1",
        "DISPATCHER_POLL_INTERVAL_S": "1",
        # Observability: spans to the test's receiver, Prometheus and Alertmanager on free ports with
        # second-scale intervals, and the closed loop's knobs turned down to test size.
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_sink.endpoint,
        "PROMETHEUS_PORT": str(free_port()),
        "ALERTMANAGER_PORT": str(free_port()),
        "POSTGRES_EXPORTER_PORT": str(free_port()),
        "PROMETHEUS_SCRAPE_INTERVAL_S": "1",
        "PROMETHEUS_RULES_DIR": str(fast_alert_rules(state / "rules")),
        "ALERTMANAGER_GROUP_WAIT_S": "1",
        "ALERT_WEBHOOK_TOKEN": ALERT_WEBHOOK_TOKEN,
        "ACCURACY_REFRESH_S": "1",
        "ACCURACY_MIN_FEEDBACK": "20",
        "ACCURACY_THRESHOLD": "0.6",
        "RETRAIN_OVERRIDES": '{"train.epochs": 3, "train.patience": 2}',
        # The edge and the protected operator routes: Nginx on free ports, Ray's token auth on.
        "NGINX_HTTPS_PORT": str(free_port()),
        "NGINX_HTTP_PORT": str(free_port()),
        "NGINX_STATUS_PORT": str(free_port()),
        "NGINX_EXPORTER_PORT": str(free_port()),
        # Far above what this machine can send, so the soak measures the platform rather than the
        # per-key limit (the limit itself is tested on an edge of its own, tests/security).
        "API_RATE_LIMIT_RPS": "100000",
        "MLFLOW_BASIC_AUTH_PASSWORD": MLFLOW_PASSWORD,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": RAY_AUTH_TOKEN,
        # The Gradio UI with its login on, as outside development.
        "UI_PORT": str(free_port()),
        "UI_PASSWORD": UI_PASSWORD,
    }
    saved = {k: os.environ.get(k) for k in overrides}
    os.environ.update(overrides)
    get_settings.cache_clear()
    env = dict(os.environ)
    started = run_cli("cluster", "up", env=env)
    try:
        assert started.returncode == 0, f"cluster up failed:\n{started.stdout}\n{started.stderr}"
        running = Stack(settings=get_settings(), env=env, api_key=api_key)
        yield running
        running.http.close()
    finally:
        run_cli("cluster", "down", env=env, timeout=120)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def train_job(stack: Stack, config: str | Path | dict[str, Any], overrides: list[str] | None = None) -> dict[str, Any]:
    """Submit a training job through the Ray Jobs API, wait for it, return its result line.

    A dict config is written next to the state dir first, as a user would write a new YAML file.
    """
    from jobs.result import training_result
    from services.ray_submission import follow_job, submit_training

    if isinstance(config, dict):
        path = stack.settings.state_dir / f"{config['name']}.yaml"
        path.write_text(yaml.safe_dump(config))
        config = path
    job_id = submit_training(stack.settings, str(config), overrides)
    status, logs = follow_job(stack.settings, job_id)
    assert status == "SUCCEEDED", logs[-4000:]
    result = training_result(logs)
    assert result is not None, logs[-4000:]
    result["job_id"] = job_id
    return result


@pytest.fixture(scope="session")
def trained(stack: Stack) -> dict[str, Any]:
    """The first model: a short training job through the Jobs API, promoted to champion."""
    return train_job(stack, "jobs/configs/adult.yaml", ["train.epochs=2", "train.patience=2"])


@pytest.fixture
def adult_paths() -> tuple[Path, Path]:
    return REPO_ROOT / "data/adult/adult.data.gz", REPO_ROOT / "data/adult/adult.test.gz"
