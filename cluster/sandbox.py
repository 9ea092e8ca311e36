"""A hermetic stack: `python -m cluster up` on ports found free, with a state directory, Ray temp
directory, job database and queues of its own, beside any other stack on this machine (a
developer's, another test session's, a benchmark's), and removed afterwards.

The tests (tests/conftest.py) and the benchmarks run against one; nothing in the platform imports
this module. Besides the stack itself: the ports it is given, the databases and queues it uses,
the handle its users reach it through, and a receiver for the spans it exports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import psutil

from cluster.edge import bearer_headers, local_ca_file, local_edge_url, nginx_binary
from core.settings import REPO_ROOT, Settings, environment_variables

if TYPE_CHECKING:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

# This machine's PostgreSQL and RabbitMQ, on which a stack gets its own databases and queues.
PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

# Ports -----------------------------------------------------------------------------------------

# Ports handed out come from below the kernel's ephemeral range (32768-60999), where Ray picks its
# own random ports and every outgoing connection takes one, and above Ray's worker port range
# (10002-19999): a port found free here is not taken by someone else before it is used. They are
# drawn at random, so processes handing out ports side by side rarely try the same one.
PORTS = range(20000, 30000)
_handed_out: set[int] = set()
# Each stack's Serve replicas take their ports from a block of their own above PORTS. Blocks are
# drawn at random and checked, so sessions running side by side do not pick the same one.
REPLICA_PORT_BLOCK = 100
REPLICA_PORT_BLOCKS = range(30000, 32000, REPLICA_PORT_BLOCK)
_replica_blocks_handed_out: set[int] = set()

# Every port a stack listens on besides RAY_GCS_PORT, MLFLOW_PORT and Serve's ingress ports, which
# stack_environment sets itself.
PORT_SETTINGS = (
    "RAY_DASHBOARD_PORT",
    "RAY_CLIENT_PORT",
    "RAY_DASHBOARD_AGENT_PORT",
    "RAY_METRICS_EXPORT_PORT",
    "RAY_AUTOSCALER_METRICS_PORT",
    "RAY_DASHBOARD_METRICS_PORT",
    "SERVE_PORT",
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


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on, never handed out before by this process."""
    for _ in range(200):
        port = random.choice(PORTS)
        if port in _handed_out or not _port_is_free(port):
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in {PORTS}")


def reserve_ports(ports: range) -> None:
    """Ports a process takes by itself (a Ray node's worker-port block): free_port never hands them out."""
    _handed_out.update(ports)


def replica_port_block() -> int:
    blocks = [b for b in REPLICA_PORT_BLOCKS if b not in _replica_blocks_handed_out]
    random.shuffle(blocks)
    for base in blocks:
        if all(_port_is_free(port) for port in range(base, base + REPLICA_PORT_BLOCK)):
            _replica_blocks_handed_out.add(base)
            return base
    raise RuntimeError(f"no free block of replica ports in {REPLICA_PORT_BLOCKS.start}-{REPLICA_PORT_BLOCKS.stop - 1}")


def serve_ingress_overrides() -> dict[str, str]:
    """Serve's HAProxy ingress of one stack: its own stats and metrics ports and replica port
    block, so stacks running side by side never collide."""
    return {
        "SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        "SERVE_FALLBACK_PROXY_PORT": str(free_port()),
        "SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port()),
        "SERVE_REPLICA_PORT_BASE": str(replica_port_block()),
        "SERVE_REPLICA_PORT_COUNT": str(REPLICA_PORT_BLOCK),
    }


# Databases and queues --------------------------------------------------------------------------


def database_url(name: str) -> str:
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def create_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(name: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.contextmanager
def temporary_database(prefix: str) -> Iterator[str]:
    """A throwaway database on this machine's PostgreSQL; yields its name, drops it afterwards."""
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    create_database(name)
    try:
        yield name
    finally:
        drop_database(name)


def training_queues(exchange: str) -> dict[str, str]:
    """The settings naming a stack's own training exchange and queues on this machine's RabbitMQ."""
    return {
        "TRAINING_EXCHANGE": exchange,
        "TRAINING_QUEUE": f"{exchange}.requests",
        "TRAINING_DEAD_LETTER_QUEUE": f"{exchange}.dead",
    }


def delete_queues(queues: Mapping[str, str]) -> None:
    """Remove what `cluster up` declared for `training_queues`: the queues and both exchanges."""
    import aio_pika

    async def delete() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            for queue in (queues["TRAINING_QUEUE"], queues["TRAINING_DEAD_LETTER_QUEUE"]):
                await channel.queue_delete(queue)
            for exchange in (queues["TRAINING_EXCHANGE"], queues["TRAINING_EXCHANGE"] + ".dead"):
                await channel.exchange_delete(exchange)

    asyncio.run(delete())


# Environment -----------------------------------------------------------------------------------


def stack_environment(
    state: Path,
    *,
    api_keys: Sequence[str],
    database_url: str,
    queues: Mapping[str, str],
    experiment: str,
    ray_auth_token: str | None = None,
    mlflow_password: str | None = None,
    ui_password: str | None = None,
) -> dict[str, str]:
    """The settings that make a stack hermetic: free ports, its own state and temp directories,
    MLflow experiment, job database and queues; Ray's token auth and the MLflow and UI logins on,
    as outside development. Secrets not given are generated."""
    gcs, mlflow = free_port(), free_port()
    return {
        "STATE_DIR": str(state),
        "RAY_GCS_PORT": str(gcs),
        "RAY_TEMP_DIR": f"/tmp/rt{gcs}",  # short: Ray's and HAProxy's socket paths are limited
        **{name: str(free_port()) for name in PORT_SETTINGS},
        **serve_ingress_overrides(),
        "MLFLOW_PORT": str(mlflow),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow}",
        "MLFLOW_EXPERIMENT": experiment,
        "API_KEYS": ",".join(api_keys),
        # Far above what this machine can send: the per-key limit protects a shared deployment;
        # here it would cap the load that soak tests and benchmarks put on the platform.
        "API_RATE_LIMIT_RPS": "100000",
        "API_RATE_LIMIT_BURST": "100000",
        "MODEL_POLL_INTERVAL_S": "1",
        "DATABASE_URL": database_url,
        "AMQP_URL": AMQP_URL,
        **queues,
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": ray_auth_token or secrets.token_hex(32),
        "MLFLOW_BASIC_AUTH_PASSWORD": mlflow_password or secrets.token_urlsafe(16),
        "UI_PASSWORD": ui_password or secrets.token_urlsafe(16),
    }


def inherited_environment() -> dict[str, str]:
    """The caller's environment without the platform's own settings: a stack running beside this
    one (a test session's, a developer's) may have set them in this process, and its database,
    limits or ports must not leak into the new stack."""
    own = {name for name, _, _ in environment_variables()}
    return {k: v for k, v in os.environ.items() if k not in own}


def settings_from(env: Mapping[str, str]) -> Settings:
    """The settings a stack started with `env` reads (the environment wins over .env)."""
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        return Settings()
    finally:
        os.environ.clear()
        os.environ.update(saved)


# Start and stop --------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """`python -m ARGS` from the repository root, as a user runs the platform's CLIs."""
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def start(env: dict[str, str], timeout_s: float = 900) -> None:
    """`cluster up` with `env`; raises with its output if it fails. Call `stop` either way: a
    failed start may leave processes behind."""
    started = run_cli("cluster", "up", env=env, timeout=timeout_s)
    if started.returncode != 0:
        raise RuntimeError(f"cluster up failed:\n{started.stdout[-10000:]}\n{started.stderr[-10000:]}")


def stop(env: dict[str, str], timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    """`cluster down` with `env`; safe to repeat."""
    return run_cli("cluster", "down", env=env, timeout=timeout_s)


@dataclass(frozen=True)
class Stack:
    """A running stack as its users reach it: its settings as its processes read them, the
    environment to run CLIs against it with, and an API key."""

    settings: Settings
    env: dict[str, str]
    api_key: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer_headers(self.api_key)

    @property
    def edge(self) -> bool:
        """Nginx runs in front (the Debian package is installed): users go through it."""
        return nginx_binary(self.settings) is not None

    @property
    def edge_url(self) -> str:
        return local_edge_url(self.settings)

    @property
    def ca_file(self) -> Path:
        """The local CA `cluster up` issued the edge's certificate from."""
        return local_ca_file(self.settings)

    @property
    def api_url(self) -> str:
        return self.edge_url if self.edge else self.settings.serve.url

    @property
    def verify(self) -> bool | str:
        return str(self.ca_file) if self.edge else True

    @cached_property
    def http(self) -> httpx.Client:
        """The inference API as a user reaches it (over TLS through Nginx when it runs), without
        credentials: each request says what it authenticates with."""
        return httpx.Client(base_url=self.api_url, verify=self.verify, timeout=30)

    def client(self) -> httpx.Client:
        """The inference API through Nginx over TLS, with the API key."""
        return httpx.Client(base_url=self.edge_url, verify=str(self.ca_file), headers=self.auth, timeout=30)

    def close(self) -> None:
        if "http" in self.__dict__:
            self.http.close()


@contextlib.contextmanager
def hermetic_stack(name: str, overrides: Mapping[str, str] | None = None) -> Iterator[Stack]:
    """`cluster up` on a fresh state directory, job database and queues named after `name`, in an
    environment of its own rather than this process's; everything removed on exit."""
    suffix = uuid.uuid4().hex[:8]
    database = f"{name}_{suffix}"
    queues = training_queues(f"{name}-{suffix}")
    key = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        env = {
            **inherited_environment(),
            **stack_environment(
                Path(tmp),
                api_keys=[key],
                database_url=database_url(database),
                queues=queues,
                experiment=f"{name}-{suffix}",
            ),
            **(overrides or {}),
        }
        create_database(database)
        try:
            start(env)
            running = Stack(settings_from(env), env, key)
            try:
                yield running
            finally:
                running.close()
        finally:
            stop(env)
            with contextlib.suppress(Exception):
                delete_queues(queues)
            drop_database(database)


def replica_pids(settings: Settings, app: str = "inference", deployment: str = "Ingress") -> list[int]:
    """The replicas of one Serve deployment of this stack, by default the inference API's (their
    Ray temp dir tells stacks apart)."""
    temp = str(settings.ray.resolved_temp_dir)
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if f"ServeReplica:{app}:{deployment}" in cmdline:
            try:
                if any(temp in " ".join(p.cmdline()) for p in [process, *process.parents()]):
                    found.append(process.pid)
            except psutil.Error:
                continue
    return found


# Spans -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, str]


class OtlpSink:
    """A minimal OTLP/HTTP trace receiver: accepts protobuf exports on /v1/traces and keeps the
    spans in memory. A stack given its endpoint (OTEL_EXPORTER_OTLP_ENDPOINT) exports here rather
    than to a collector: the tests check what it exports, the benchmarks what exporting costs."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        self.spans: list[ReceivedSpan] = []
        self.requests = 0
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.path != "/v1/traces":
                    self.send_error(404)
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                sink.receive(request)
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> OtlpSink:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def receive(self, request: ExportTraceServiceRequest) -> None:
        found: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            service = resource.get("service.name", "")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(
                        ReceivedSpan(
                            service=service,
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: a.value.string_value for a in span.attributes},
                        )
                    )
        with self._lock:
            self.requests += 1
            self.spans.extend(found)

    def spans_of(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [s for s in self.spans if s.trace_id == trace_id]
