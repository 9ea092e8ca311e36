"""The operator routes behind Nginx: MLflow asks for its basic-auth login, Ray's dashboard and Jobs
API for the cluster's token (RAY_AUTH_MODE=token), and an API key opens neither."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.sandbox import Stack
from cluster.supervisor import local_cluster_environment
from tests.conftest import MLFLOW_PASSWORD, RAY_AUTH_TOKEN
from tests.edge_helpers import require_edge

MLFLOW_API = "/mlflow/api/2.0/mlflow/experiments/search"
# The dashboard's own REST API and the Jobs API, as `ray job submit --address https://.../ray` calls them.
# (The dashboard's static page loads without the token and asks for it; its data comes from these.)
RAY_ROUTES = ["/ray/api/jobs/", "/ray/api/version", "/ray/nodes?view=summary", "/ray/api/cluster_status"]


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    return require_edge(stack)


def test_mlflow_only_with_its_credentials(edge: Stack) -> None:
    params = {"max_results": "1"}
    for path in (MLFLOW_API, "/mlflow/"):
        refused = edge.http.get(path, params=params)
        assert refused.status_code == 401, path
        assert refused.headers["www-authenticate"].startswith("Basic"), path
        assert edge.http.get(path, params=params, auth=("mlflow", "wrong")).status_code == 401, path
        assert edge.http.get(path, params=params, headers=edge.auth).status_code == 401, "an API key is not a login"
    allowed = edge.http.get(MLFLOW_API, params=params, auth=(edge.settings.mlflow.basic_auth_user, MLFLOW_PASSWORD))
    assert allowed.status_code == 200, allowed.text
    assert "experiments" in allowed.json()
    ui = edge.http.get("/mlflow/", auth=(edge.settings.mlflow.basic_auth_user, MLFLOW_PASSWORD))
    assert ui.status_code == 200 and "static-files" in ui.text


@pytest.mark.parametrize("path", RAY_ROUTES)
def test_ray_dashboard_and_jobs_api_only_with_the_token(edge: Stack, path: str) -> None:
    assert edge.http.get(path).status_code == 401
    assert edge.http.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert edge.http.get(path, headers=edge.auth).status_code == 403, "an API key is not the token"
    allowed = edge.http.get(path, headers={"Authorization": f"Bearer {RAY_AUTH_TOKEN}"})
    assert allowed.status_code == 200, allowed.text[:500]


def test_submitting_a_job_without_the_token_is_refused(edge: Stack) -> None:
    refused = edge.http.post("/ray/api/jobs/", json={"entrypoint": "echo pwned"})
    assert refused.status_code == 401
    listed = edge.http.get("/ray/api/jobs/", headers={"Authorization": f"Bearer {RAY_AUTH_TOKEN}"})
    assert all(job.get("entrypoint") != "echo pwned" for job in listed.json())


def test_the_gcs_refuses_a_driver_without_the_token(edge: Stack, tmp_path: Path) -> None:
    """Token auth covers Ray's gRPC too, not only the HTTP front Nginx exposes."""
    code = f"import ray; ray.init(address='{edge.settings.ray.gcs_address}'); print('connected')"
    env = {k: v for k, v in edge.env.items() if k not in {"RAY_AUTH_TOKEN", "RAY_AUTH_MODE"}}
    env["HOME"] = str(tmp_path)
    # Where the stack's drivers find a loopback GCS, as every process `cluster up` starts does.
    env.update(local_cluster_environment(edge.settings))
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


def test_ray_job_submit_through_nginx_needs_the_token(edge: Stack, tmp_path: Path) -> None:
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
