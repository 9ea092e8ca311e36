"""A whole platform stack of the benchmarks' own: `cluster up` with its own ports, state directory,
job database and queues, beside any stack already running on the machine, removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import httpx
import psycopg

from cluster.edge import bearer_headers, local_ca_file, local_edge_url
from core.settings import REPO_ROOT, Settings, environment_variables

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
# Apart from the ports the test suite hands out (20000-29999 and replica blocks 30000-31999),
# below the kernel's ephemeral range.
PORTS = range(32000, 32700)
REPLICA_PORT_BASE = 32700
REPLICA_PORT_COUNT = 30
_handed_out: set[int] = set()


def free_port() -> int:
    for port in PORTS:
        if port in _handed_out:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


@dataclass(frozen=True)
class BenchStack:
    settings: Settings
    env: dict[str, str]
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    @property
    def edge_url(self) -> str:
        return local_edge_url(self.settings)

    @property
    def ca_file(self) -> Path:
        return local_ca_file(self.settings)

    def client(self) -> httpx.Client:
        """The inference API as users reach it: through Nginx over TLS."""
        return httpx.Client(base_url=self.edge_url, verify=str(self.ca_file), headers=self.auth, timeout=30)


def inherited_environment() -> dict[str, str]:
    """The caller's environment without the platform's own settings: a stack running beside this
    one (a test session's, a developer's) may have set them in this process, and its database,
    limits or ports must not leak into the benchmark's stack."""
    own = {name for name, _, _ in environment_variables()}
    return {k: v for k, v in os.environ.items() if k not in own}


def environment(state: Path, database: str, suffix: str, key: str) -> dict[str, str]:
    gcs, mlflow = free_port(), free_port()
    ports = (
        "RAY_DASHBOARD_PORT",
        "RAY_CLIENT_PORT",
        "RAY_DASHBOARD_AGENT_PORT",
        "RAY_METRICS_EXPORT_PORT",
        "SERVE_PORT",
        "SERVE_HAPROXY_STATS_PORT",
        "SERVE_HAPROXY_METRICS_PORT",
        "SERVE_FALLBACK_PROXY_PORT",
        "SERVE_FALLBACK_PROXY_GRPC_PORT",
        "DISPATCHER_METRICS_PORT",
        "PROMETHEUS_PORT",
        "ALERTMANAGER_PORT",
        "POSTGRES_EXPORTER_PORT",
        "NGINX_HTTPS_PORT",
        "NGINX_HTTP_PORT",
        "NGINX_STATUS_PORT",
        "NGINX_EXPORTER_PORT",
        "UI_PORT",
    )
    return {
        **inherited_environment(),
        "STATE_DIR": str(state),
        "RAY_GCS_PORT": str(gcs),
        "RAY_TEMP_DIR": f"/tmp/rtb{gcs}",  # short: Ray's and HAProxy's socket paths are limited
        **{name: str(free_port()) for name in ports},
        "SERVE_REPLICA_PORT_BASE": str(REPLICA_PORT_BASE),
        "SERVE_REPLICA_PORT_COUNT": str(REPLICA_PORT_COUNT),
        "MLFLOW_PORT": str(mlflow),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow}",
        "MLFLOW_EXPERIMENT": f"bench-{suffix}",
        "API_KEYS": key,
        # The per-key limit protects a shared deployment; here it would cap what is measured.
        "API_RATE_LIMIT_RPS": "100000",
        "API_RATE_LIMIT_BURST": "100000",
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:5432/{database}",
        "AMQP_URL": AMQP_URL,
        "TRAINING_EXCHANGE": f"bench-{suffix}",
        "TRAINING_QUEUE": f"bench-{suffix}.requests",
        "TRAINING_DEAD_LETTER_QUEUE": f"bench-{suffix}.dead",
        "MODEL_POLL_INTERVAL_S": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "MLFLOW_BASIC_AUTH_PASSWORD": secrets.token_urlsafe(16),
        "UI_PASSWORD": secrets.token_urlsafe(16),
    }


def cli(env: dict[str, str], *args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout_s,
    )


def _settings(env: dict[str, str]) -> Settings:
    # The stack's settings as its processes read them: from this environment, not the caller's.
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _create_database(database: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}"')


def _drop_database(database: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


def delete_queues(suffix: str) -> None:
    async def delete() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (f"bench-{suffix}.requests", f"bench-{suffix}.dead"):
                await channel.queue_delete(queue)
            for exchange in (f"bench-{suffix}", f"bench-{suffix}.dead"):
                await channel.exchange_delete(exchange)

    asyncio.run(delete())


@contextlib.contextmanager
def bench_stack() -> Iterator[BenchStack]:
    """`cluster up` on a fresh state directory, job database and queues; all removed on exit."""
    suffix = uuid.uuid4().hex[:8]
    database = f"bench_{suffix}"
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        env = environment(Path(tmp), database, suffix, key)
        _create_database(database)
        try:
            started = cli(env, "up")
            if started.returncode != 0:
                raise RuntimeError(f"cluster up failed:\n{started.stdout[-3000:]}\n{started.stderr[-3000:]}")
            yield BenchStack(_settings(env), env, key)
        finally:
            cli(env, "down")
            with contextlib.suppress(Exception):
                delete_queues(suffix)
            _drop_database(database)
