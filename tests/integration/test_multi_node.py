"""Scale-out on one machine: a second Ray node joins the test stack's head, and Ray Train workers and
Serve replicas are placed on both nodes. Placement is read from the Ray State API (the node each
actor ran on), not inferred from answers that would come back from one node just as well.

The node joins the session's stack rather than a head of its own: the training job then takes the
path a user's does (Jobs API, MLflow on PostgreSQL, the stack's environment and token). It leaves
no trace for later tests: it registers under a model name of its own without promotion, deletes
its Serve app, and the node is stopped (its whole process session) and seen dead by the GCS and
gone from Prometheus' target list before the module ends.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.apps import serve_app_status
from cluster.sandbox import Stack
from cluster.supervisor import child_environment
from core.health import wait_until
from tests.conftest import train_job
from tests.ray_nodes import NODE_IP, RayNode, alive_nodes, discovered_targets, ray_node, state

NODE_RESOURCE = "node2"
NODE_CPUS = 2
APP = "spread-test"
ROUTE = "/spread"
MODEL_NAME = "multi-node-test"


@pytest.fixture(scope="module")
def second_node(stack: Stack) -> Iterator[RayNode]:
    with ray_node(stack, "ray-node2", {NODE_RESOURCE: 1}, NODE_CPUS) as node:
        yield node


def test_second_node_joins_with_its_own_ports_and_resources(stack, second_node):
    nodes = {n.node_id: n for n in alive_nodes(stack)}
    node = nodes[second_node.node_id]
    assert node.node_ip == NODE_IP and not node.is_head_node
    assert node.resources_total["CPU"] == NODE_CPUS and node.resources_total[NODE_RESOURCE] == 1
    assert second_node.head_node_id in nodes and second_node.head_node_id != second_node.node_id
    # Its metrics agent joins the head's service discovery file, which Prometheus scrapes.
    assert wait_until(lambda: second_node.metrics_address in discovered_targets(stack), 60)


def test_training_workers_run_on_both_nodes(stack, second_node):
    from ray.job_submission import JobSubmissionClient

    overrides = [
        "train.epochs=1",
        "train.num_workers=2",
        "train.placement_strategy=SPREAD",
        # A model of its own and no promotion: the session's champion stays what other tests made it.
        f"model_name={MODEL_NAME}",
        "promotion.enabled=false",
    ]
    result = train_job(stack, "jobs/configs/adult.yaml", overrides)
    assert result["model_name"] == MODEL_NAME and result["promotion"] is None
    jobs = JobSubmissionClient(stack.settings.ray.dashboard_url, headers=stack.settings.ray.auth_headers())
    ray_job_id = jobs.get_job_info(result["job_id"]).job_id
    assert ray_job_id is not None
    workers = state(stack, "actors", [("class_name", "=", "RayTrainWorker"), ("job_id", "=", ray_job_id)])
    assert len(workers) == 2, [(w.actor_id, w.state, w.node_id) for w in workers]  # no worker restarted
    assert {w.node_id for w in workers} == {second_node.head_node_id, second_node.node_id}


# A driver process of its own, with the stack's environment (token included), for the same reason
# as state(); and a class defined in __main__ travels to the replicas by value.
SERVE_DRIVER = """
import sys

import ray
from ray import serve
from ray.serve import api as serve_api

action, address, app, route = sys.argv[1:]
ray.init(address=address, log_to_driver=False)
if action == "delete":
    serve.delete(app)
else:
    class NodeProbe:
        def __call__(self, request):
            return ray.get_runtime_context().get_node_id()

    # Two replicas, at most one a node: one on each node.
    probe = serve.deployment(
        name="NodeProbe", num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.1}
    )
    # Not waiting: serve.run would wait until every node's HAProxy reaches every app's replicas,
    # and on one machine the head's HAProxy is given the second node's replica at that node's
    # address, 127.0.0.2, where it does not listen: it binds SERVE_HOST, 127.0.0.1 (a real
    # cluster binds 0.0.0.0).
    serve_api._run(probe(NodeProbe).bind(), name=app, route_prefix=route, _blocking=False)
"""


def serve_driver(stack: Stack, action: str) -> None:
    argv = [sys.executable, "-c", SERVE_DRIVER, action, stack.settings.ray.gcs_address, APP, ROUTE]
    env = child_environment(stack.settings)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-3000:]


def serve_applications(stack: Stack) -> dict[str, Any]:
    url = f"{stack.settings.ray.dashboard_url}/api/serve/applications/"
    response = httpx.get(url, headers=stack.settings.ray.auth_headers(), timeout=10)
    response.raise_for_status()
    applications: dict[str, Any] = response.json()["applications"]
    return applications


@pytest.fixture
def spread_app(stack, second_node) -> Iterator[str]:
    serve_driver(stack, "deploy")
    try:
        running = lambda: serve_applications(stack).get(APP, {}).get("status") == "RUNNING"  # noqa: E731
        assert wait_until(running, 90), serve_applications(stack).get(APP)
        yield APP
    finally:
        serve_driver(stack, "delete")
        assert APP not in serve_applications(stack)
        # The platform's own app was not disturbed by the second node or the test app.
        assert serve_app_status(stack.settings)[0] == "RUNNING"


def test_serve_replicas_run_on_both_nodes(stack, second_node, spread_app):
    app = serve_applications(stack)[spread_app]
    assert app["status"] == "RUNNING"
    replicas = state(stack, "actors", [("class_name", "=", f"ServeReplica:{APP}:NodeProbe"), ("state", "=", "ALIVE")])
    assert sorted(str(r.node_id) for r in replicas) == sorted([second_node.head_node_id, second_node.node_id])
    # Serve's own view agrees with the State API.
    listed = app["deployments"]["NodeProbe"]["replicas"]
    assert sorted(r["node_id"] for r in listed if r["state"] == "RUNNING") == sorted(str(r.node_id) for r in replicas)
    # Each node's proxy serves the app (proxy_location EveryNode in serve_apps/config.yaml), and
    # the second node's reaches the replica on its own node. HAProxy balances over every replica
    # it reaches: on one machine the second node's also reaches the head's, at 127.0.0.1.
    answers: dict[int, set[str]] = {}

    def answered(port: int, node_id: str | None = None) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"http://127.0.0.1:{port}{ROUTE}", timeout=5)
            if response.status_code == 200:
                answers.setdefault(port, set()).add(response.text)
        return port in answers if node_id is None else node_id in answers.get(port, set())

    assert wait_until(lambda: answered(stack.settings.serve.port), 30)
    assert wait_until(lambda: answered(second_node.serve_port, second_node.node_id), 60), answers
    both = {second_node.head_node_id, second_node.node_id}
    assert answers[stack.settings.serve.port] <= both and answers[second_node.serve_port] <= both
