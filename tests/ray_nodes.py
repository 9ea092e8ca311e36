"""More Ray nodes on this one machine, joined to the session stack's head: started, stopped or killed
like a cloud VM or a Kubernetes pod would be, and read back through the Ray State API.

Each node runs `ray start --block` in a process session of its own (the supervisor's `spawn`), so
stopping or killing the node reaches its raylet, agents and workers and nothing else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from cluster.observability import RAY_SERVICE_DISCOVERY_FILE
from cluster.sandbox import Stack, free_port, reserve_ports
from cluster.supervisor import (
    LOCAL_CLUSTER_VARIABLE,
    Managed,
    child_environment,
    log_tail,
    managed,
    read_pid,
    session_members,
    spawn,
    stop,
)
from core.health import wait_until
from core.settings import Settings

# Its own loopback address: drivers on this machine (127.0.0.1) keep connecting to the head's
# raylet, and the node shows up in the State API as a different host, as on a real cluster.
NODE_IP = "127.0.0.2"


@dataclass(frozen=True)
class RayNode:
    name: str
    node_id: str
    head_node_id: str
    metrics_address: str
    serve_port: int  # its Serve proxy's port (the head's is taken on this one machine)
    process: subprocess.Popen[bytes]
    item: Managed
    temp_dir: Path


def state(stack: Stack, resource: str, filters: list[tuple[str, str, str]] | None = None) -> list[Any]:
    """The State API with the stack's token given explicitly: Ray reads RAY_AUTH_MODE once per process,
    at import, and this process may have imported Ray before the stack fixture set it."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=stack.settings.ray.dashboard_url, headers=stack.settings.ray.auth_headers())
    options = ListApiOptions(filters=list(filters or []), detail=True)
    return list(client.list(StateResource(resource), options=options, raise_on_missing_output=True))


def alive_nodes(stack: Stack) -> list[Any]:
    # Filtered here, not by the State API: it counts the nodes a filter leaves out (a dead one)
    # as truncated output, and refuses to answer.
    return [n for n in state(stack, "nodes") if n.state == "ALIVE"]


def node_state(stack: Stack, node_id: str) -> str | None:
    return {n.node_id: n.state for n in state(stack, "nodes")}.get(node_id)


def worker_port_range() -> tuple[int, int]:
    """A block of worker ports apart from the head's (10002-19999), varied between sessions."""
    low = 24000 + (free_port() % 40) * 50
    # Reserved, so that the node's other ports, drawn from the same range, never fall inside it.
    reserve_ports(range(low, low + 50))
    return low, low + 49


def running(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return process.status() != psutil.STATUS_ZOMBIE
    return False


def discovered_targets(stack: Stack) -> list[str]:
    path = stack.settings.ray.resolved_temp_dir / RAY_SERVICE_DISCOVERY_FILE
    try:
        groups = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [target for group in groups for target in group["targets"]]


def joinable_gcs_address(settings: Settings) -> str:
    """The head's GCS as `ray start --address` on this machine reaches it. Ray swaps a loopback
    address for the machine's routable one before it joins (`resolve_ip_for_localhost` in
    ray/_private/services.py), and a loopback head listens on loopback only; the IPv4-mapped
    form of the address is the same dual-stack socket to the kernel but not loopback to Ray. Nodes
    on other machines join a head whose RAY_HOST is its private address, which Ray keeps."""
    host = "127.0.0.1" if settings.ray.host == "localhost" else settings.ray.host
    if not settings.ray.local_only or ipaddress.ip_address(host).version != 4:
        return settings.ray.gcs_address
    return f"[::ffff:{host}]:{settings.ray.gcs_port}"


def start_node(stack: Stack, name: str, resources: dict[str, float], cpus: int) -> RayNode:
    """Start a worker node that advertises `resources`; returns once the GCS lists it alive."""
    settings = stack.settings
    item = managed(settings, name)
    # Short: Ray's socket paths are limited. One per node name: a killed node leaves its sockets behind.
    temp_dir = Path(f"/tmp/rn{settings.ray.gcs_port}{name.rsplit('-', 1)[-1]}")
    metrics_port, serve_port = free_port(), free_port()
    low, high = worker_port_range()
    argv = [
        str(Path(sys.executable).parent / "ray"), "start", "--block", "--disable-usage-stats",
        "--address", joinable_gcs_address(settings),
        "--node-ip-address", NODE_IP,
        "--num-cpus", str(cpus),
        "--resources", json.dumps(resources),
        "--node-manager-port", str(free_port()),
        "--object-manager-port", str(free_port()),
        "--metrics-export-port", str(metrics_port),
        "--dashboard-agent-listen-port", str(free_port()),
        "--dashboard-agent-grpc-port", str(free_port()),
        "--runtime-env-agent-port", str(free_port()),
        "--min-worker-port", str(low), "--max-worker-port", str(high),
        # A node may keep its own temp dir; this one's sessions and logs stay apart from the head's.
        "--temp-dir", str(temp_dir),
    ]  # fmt: skip
    # The head's environment (code path, MLflow, S3, Ray token when the stack has one) plus the
    # Serve ingress's ports and files on this node: both nodes' HAProxies share one machine.
    serve = settings.serve.model_copy(
        update={
            "haproxy_stats_port": free_port(),
            "haproxy_metrics_port": free_port(),
            "fallback_proxy_port": free_port(),
            "fallback_proxy_grpc_port": free_port(),
        }
    )
    ray = settings.ray.model_copy(update={"temp_dir": temp_dir})
    ports = settings.model_copy(update={"ray": ray, "serve": serve})
    env = {
        **child_environment(settings),
        **ports.serve_environment(),
        "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(serve_port),
    }
    # Another machine's node is no part of the head's one-machine cluster: `ray start` refuses to
    # join a node with that switch set.
    env.pop(LOCAL_CLUSTER_VARIABLE, None)
    # A node killed a moment ago may still be listed alive with the same address and resources.
    earlier = {n.node_id for n in alive_nodes(stack)}
    proc = spawn(item, argv, env)
    found: list[Any] = []

    def joined() -> bool:
        found[:] = [
            n
            for n in alive_nodes(stack)
            if n.node_id not in earlier and n.node_ip == NODE_IP and _advertises(n.resources_total, resources)
        ]
        return bool(found) or proc.poll() is not None

    if not (wait_until(joined, 90) and found):
        tail = log_tail(item, 20)
        stop(item, grace_s=15)
        proc.wait(10)
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise AssertionError(f"node {name} did not join: {tail}")
    (head,) = [n for n in alive_nodes(stack) if n.is_head_node]
    metrics_address = f"{NODE_IP}:{metrics_port}"
    return RayNode(name, found[0].node_id, head.node_id, metrics_address, serve_port, proc, item, temp_dir)


def _advertises(total: dict[str, float], resources: dict[str, float]) -> bool:
    return all(total.get(key) == amount for key, amount in resources.items())


def kill_node(node: RayNode) -> None:
    """The node's machine gone at once: SIGKILL to every process of its session (raylet, agents,
    workers), nothing shut down in order and nothing told to the GCS."""
    members = session_members(node.process.pid)
    with contextlib.suppress(psutil.Error):
        members.append(psutil.Process(node.process.pid))

    def all_dead() -> bool:
        # Re-listed on every pass: a raylet may fork a worker between two listings.
        alive = [p for p in [*members, *session_members(node.process.pid)] if running(p)]
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.send_signal(signal.SIGKILL)
        return not alive

    assert wait_until(all_dead, 30, max_wait_s=0.2), f"node {node.name} survived SIGKILL"
    node.process.wait(10)  # our child: reaped here, not left a zombie


def stop_node(stack: Stack, node: RayNode) -> None:
    """Stop the node (a no-op for a killed one) and check it left nothing: no process of its
    session, no temp dir, the GCS sees it dead and Prometheus no longer scrapes it."""
    processes: list[psutil.Process] = []
    with contextlib.suppress(psutil.Error):
        processes = [psutil.Process(node.process.pid), *psutil.Process(node.process.pid).children(recursive=True)]
    stop(node.item, grace_s=15)
    node.process.wait(10)
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    # Zombies count as gone (as in `cluster down`): orphans wait for whoever adopted them to reap them.
    assert read_pid(node.item) is None
    assert not [p for p in [*processes, *session_members(node.process.pid)] if running(p)]
    assert wait_until(lambda: node_state(stack, node.node_id) == "DEAD", 90), node_state(stack, node.node_id)
    # Prometheus reads Ray's target list: a stopped node must not stay a dead target.
    assert wait_until(lambda: node.metrics_address not in discovered_targets(stack), 60)


@contextlib.contextmanager
def ray_node(stack: Stack, name: str, resources: dict[str, float], cpus: int) -> Iterator[RayNode]:
    """A node for the duration of the block, stopped and checked gone afterwards."""
    node = start_node(stack, name, resources, cpus)
    try:
        yield node
    finally:
        stop_node(stack, node)
