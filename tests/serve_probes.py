"""Reading Serve's own account of the inference deployment while a test drives it: the controller's
state (through the dashboard's Serve API, which `serve status` prints) and the metrics Serve
exports to the stack's Prometheus."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx

from cluster.apps import SERVE_APP
from cluster.sandbox import Stack
from serve_apps.serve_config import DEPLOYMENT

# The labels Serve puts on every series of the inference deployment.
INGRESS_SELECTOR = f'application="{SERVE_APP}",deployment="{DEPLOYMENT}"'


def ingress_details(stack: Stack) -> dict[str, Any]:
    """The controller's view of the ingress deployment: its applied config, the replica count the
    autoscaler aims at (`target_num_replicas`) and every replica with its state."""
    url = f"{stack.settings.ray.dashboard_url}/api/serve/applications/"
    response = httpx.get(url, headers=stack.settings.ray.auth_headers(), timeout=10)
    response.raise_for_status()
    details: dict[str, Any] = response.json()["applications"][SERVE_APP]["deployments"][DEPLOYMENT]
    return details


def replica_states(details: dict[str, Any]) -> dict[str, int]:
    """Replicas by state, e.g. {"RUNNING": 1, "STOPPING": 1}."""
    return dict(Counter(str(replica["state"]) for replica in details["replicas"]))


def prometheus_query(stack: Stack, promql: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{stack.settings.prometheus.url}/api/v1/query", params={"query": promql}, timeout=10)
    assert response.status_code == 200, response.text
    result: list[dict[str, Any]] = response.json()["data"]["result"]
    return result


def prometheus_scalar(stack: Stack, promql: str) -> float | None:
    """The value of a query that yields one series (an aggregate); None while it yields none."""
    result = prometheus_query(stack, promql)
    assert len(result) <= 1, result
    return float(result[0]["value"][1]) if result else None
