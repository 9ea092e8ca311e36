"""The stack as users reach it: https through Nginx. Its authentication, TLS settings and rate limits
are checked in tests/security/."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.sandbox import Stack, free_port
from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW
from tests.edge_helpers import require_edge, spare_edge


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    return require_edge(stack)


def test_plain_http_redirects_to_https(edge):
    response = httpx.get(f"http://127.0.0.1:{edge.settings.nginx.http_port}/v1/predict?x=1")
    assert response.status_code == 301
    assert response.headers["location"] == f"https://127.0.0.1:{edge.settings.nginx.https_port}/v1/predict?x=1"


def test_prediction_through_the_edge_keeps_ids_and_sets_security_headers(edge, trained):
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {**edge.auth, "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01", "X-Request-ID": "edge-req-1"}
    response = edge.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=headers)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"]["version"] == str(trained["model_version"])
    # The caller's request id and trace survive the hop through Nginx.
    assert body["request_id"] == "edge-req-1" == response.headers["x-request-id"]
    assert response.headers["x-trace-id"] == trace_id
    assert response.headers["strict-transport-security"].startswith("max-age=")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers or response.headers["server"] == "nginx"
    # Nginx writes the access line once the response is out, so it may trail the response a little.
    log_file = edge.settings.logs_dir / "nginx-access.log"
    assert wait_until(lambda: "edge-req-1" in log_file.read_text(), 10)
    access = log_file.read_text().splitlines()
    lines = [json.loads(line) for line in access if "edge-req-1" in line]
    assert lines[-1]["trace_id"] == trace_id and lines[-1]["status"] == 200
    assert edge.api_key not in "\n".join(access), "API keys must never reach the access log"


def test_api_errors_from_the_edge_are_json(edge):
    missing_key = edge.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]})
    assert missing_key.status_code == 401 and missing_key.json()["error"]["code"] == "unauthorized"
    too_large = edge.http.post(
        "/v1/predict", content=b"[" + b" " * 3_000_000 + b"]", headers={**edge.auth, "content-type": "application/json"}
    )
    assert too_large.status_code == 413
    assert too_large.json()["error"]["code"] == "payload_too_large"
    unknown = edge.http.get("/no/such/route")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"


@pytest.fixture
def second_edge(edge: Stack, tmp_path: Path) -> Iterator[Stack]:
    """Another Nginx from the same template: two Serve upstreams of which the first is down, and a
    rate limit of 2 requests per second."""
    upstreams = [f"127.0.0.1:{free_port()}", f"{edge.settings.serve.host}:{edge.settings.serve.port}"]
    limits = {"rate_limit_rps": 2, "rate_limit_burst": 3}
    with spare_edge(edge, tmp_path / "state", nginx={"serve_upstreams": upstreams}, api=limits) as running:
        yield running


def test_a_dead_ingress_upstream_costs_no_request(second_edge, trained):
    running = second_edge
    statuses = []
    for _ in range(6):
        response = running.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=running.auth)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    # The first upstream refuses connections; every prediction is answered by the second.
    assert statuses[:3] == [200, 200, 200], statuses
