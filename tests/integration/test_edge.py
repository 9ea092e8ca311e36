"""The stack as users reach it: https through Nginx, with the operator UIs behind authentication."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cluster.edge import edge_dir, ensure_certificate, local_ca_file, local_config, nginx_binary, prepare_dirs, render
from cluster.health import wait_healthy, wait_until
from serve_apps.schemas import EXAMPLE_ROW
from tests.conftest import MLFLOW_PASSWORD, RAY_AUTH_TOKEN, Stack, free_port


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    if not stack.edge:
        pytest.fail("nginx is not installed: `make tools` installs it (the edge is part of the stack)")
    return stack


def _openssl(edge: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    address = f"{edge.settings.nginx_host}:{edge.settings.nginx_https_port}"
    argv = ["openssl", "s_client", "-connect", address, "-CAfile", str(edge.verify), "-brief", *args]
    return subprocess.run(argv, input="", capture_output=True, text=True, timeout=30, check=False)


def test_plain_http_redirects_to_https(edge):
    response = httpx.get(f"http://127.0.0.1:{edge.settings.nginx_http_port}/v1/predict?x=1")
    assert response.status_code == 301
    assert response.headers["location"] == f"https://127.0.0.1:{edge.settings.nginx_https_port}/v1/predict?x=1"


def test_only_tls_12_and_13_with_strong_ciphers(edge):
    assert _openssl(edge, "-tls1_3").returncode == 0
    assert _openssl(edge, "-tls1_2").returncode == 0
    # Protocols and suites without forward secrecy or AEAD are refused at the handshake.
    assert _openssl(edge, "-tls1_1").returncode != 0
    assert _openssl(edge, "-tls1_2", "-cipher", "AES128-SHA").returncode != 0
    assert _openssl(edge, "-tls1_2", "-cipher", "ECDHE-RSA-AES128-SHA").returncode != 0


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
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"


def test_mlflow_only_with_its_credentials(edge, trained):
    url = "/mlflow/api/2.0/mlflow/registered-models/get"
    params = {"name": edge.settings.model_name}
    assert edge.http.get(url, params=params).status_code == 401
    assert edge.http.get(url, params=params, auth=("mlflow", "wrong")).status_code == 401
    assert edge.http.get(url, params=params, headers=edge.auth).status_code == 401, "an API key is not a login"
    allowed = edge.http.get(url, params=params, auth=(edge.settings.mlflow_basic_auth_user, MLFLOW_PASSWORD))
    assert allowed.status_code == 200, allowed.text
    assert allowed.json()["registered_model"]["name"] == edge.settings.model_name
    ui = edge.http.get("/mlflow/", auth=(edge.settings.mlflow_basic_auth_user, MLFLOW_PASSWORD))
    assert ui.status_code == 200 and "static-files" in ui.text


def test_ray_dashboard_and_jobs_api_only_with_the_token(edge):
    assert edge.http.get("/ray/api/jobs/").status_code == 401
    assert edge.http.get("/ray/api/jobs/", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert edge.http.get("/ray/api/jobs/", headers=edge.auth).status_code == 403, "an API key is not the token"
    allowed = edge.http.get("/ray/api/jobs/", headers={"Authorization": f"Bearer {RAY_AUTH_TOKEN}"})
    assert allowed.status_code == 200 and isinstance(allowed.json(), list)


def test_the_gcs_refuses_a_driver_without_the_token(edge, tmp_path):
    """Token auth covers Ray's gRPC too, not only the HTTP front Nginx exposes."""
    code = f"import ray; ray.init(address='{edge.settings.ray_gcs_address}'); print('connected')"
    env = {k: v for k, v in edge.env.items() if k not in {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}}
    env["HOME"] = str(tmp_path)
    refused = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "connected" not in refused.stdout
    assert "AuthenticationError" in refused.stderr or "authentication" in refused.stderr.lower(), refused.stderr[-2000:]


def _ray_submit(edge: Stack, env: dict[str, str], workdir: Path) -> subprocess.CompletedProcess[str]:
    ray = str(Path(sys.executable).parent / "ray")
    argv = [
        ray, "job", "submit", "--address", f"{edge.api_url}/ray", "--verify", str(edge.verify),
        "--working-dir", str(workdir), "--", "python", "hello.py",
    ]  # fmt: skip
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=180, check=False)


def test_ray_job_submit_through_nginx_needs_the_token(edge, tmp_path):
    (tmp_path / "hello.py").write_text("print('hello from a job submitted through nginx')\n")
    without = {k: v for k, v in edge.env.items() if k not in {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}}
    without["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = _ray_submit(edge, without, tmp_path)
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    accepted = _ray_submit(edge, {**without, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_AUTH_TOKEN}, tmp_path)
    assert accepted.returncode == 0, accepted.stdout[-2000:] + accepted.stderr[-2000:]
    assert "hello from a job submitted through nginx" in accepted.stdout
    assert "succeeded" in accepted.stdout


@pytest.fixture
def second_edge(edge: Stack, tmp_path: Path) -> Iterator[tuple[Stack, subprocess.Popen[bytes], Path]]:
    """Another Nginx from the same template on free ports, for limits too tight for the shared one:
    two Serve upstreams of which the first is down, and a rate limit of 2 requests per second."""
    settings = edge.settings.model_copy(
        update={
            "state_dir": tmp_path / "state",
            "nginx_https_port": free_port(),
            "nginx_http_port": free_port(),
            "nginx_status_port": free_port(),
            "nginx_serve_upstreams": [
                f"127.0.0.1:{free_port()}",
                f"{edge.settings.serve_host}:{edge.settings.serve_port}",
            ],
            "api_rate_limit_rps": 2,
            "api_rate_limit_burst": 3,
        }
    )
    prepare_dirs(settings)
    cert, key = ensure_certificate(settings)
    config = edge_dir(settings) / "nginx.conf"
    config.write_text(render(local_config(settings, None, None, cert, key)))
    binary = nginx_binary(settings)
    assert binary is not None
    argv = [binary, "-p", str(edge_dir(settings)), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = Stack(settings=settings, env=edge.env, api_key=edge.api_key)
    health = f"https://127.0.0.1:{settings.nginx_https_port}/healthz"
    assert wait_healthy(health, 30, lambda: proc.poll() is None, verify=str(local_ca_file(settings)))
    yield running, proc, config
    proc.terminate()
    proc.wait(10)
    running.http.close()


def test_a_dead_ingress_upstream_costs_no_request(second_edge, trained):
    running, _, _ = second_edge
    statuses = []
    for _ in range(6):
        response = running.http.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=running.auth)
        statuses.append(response.status_code)
        if response.status_code == 429:
            break
    # The first upstream refuses connections; every prediction is answered by the second.
    assert statuses[:3] == [200, 200, 200], statuses


def test_rate_limit_is_per_key_and_answers_429(second_edge, trained):
    running, _, _ = second_edge
    other_key = f"second-{running.api_key}"  # the stack's second configured key
    body = {"instances": [EXAMPLE_ROW]}
    first = [running.http.post("/v1/predict", json=body, headers=running.auth) for _ in range(12)]
    codes = [r.status_code for r in first]
    assert 429 in codes, codes
    limited = next(r for r in first if r.status_code == 429)
    assert limited.json()["error"]["code"] == "rate_limited" and limited.headers["retry-after"] == "1"
    # Another key has its own budget.
    other = running.http.post("/v1/predict", json=body, headers={"Authorization": f"Bearer {other_key}"})
    assert other.status_code == 200, other.text
