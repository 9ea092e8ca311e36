"""No secret reaches a log file: after the stack has been used with every kind of credential (and
with wrong ones), none of them appears in any log the stack writes."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.sandbox import Stack, run_cli
from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW
from tests.conftest import ALERT_WEBHOOK_TOKEN, MLFLOW_PASSWORD, RAY_AUTH_TOKEN, UI_PASSWORD
from tests.edge_helpers import require_edge


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    return require_edge(stack)


def log_files(stack: Stack) -> list[Path]:
    """The state dir's logs (every managed process, Nginx's access and error logs) and Ray's
    session logs (GCS, raylet, dashboard, Serve controller and replicas, job drivers)."""
    roots = [stack.settings.logs_dir, *stack.settings.ray.resolved_temp_dir.glob("session_*/logs")]
    files = [path for root in roots for path in root.rglob("*") if path.is_file() and not path.is_symlink()]
    # Anything else the state dir holds that is a log by its name (MLflow's, Prometheus's).
    files += [p for p in stack.settings.state_dir.rglob("*.log") if p.is_file() and p not in files]
    return files


def exercise(edge: Stack, extra_key: str) -> None:
    """Each credential once where it belongs, and where it does not, through the edge."""
    predict = {"instances": [EXAMPLE_ROW]}
    assert edge.http.post("/v1/predict", json=predict, headers=edge.auth).status_code == 200
    assert edge.http.post("/v1/predict", json=predict, headers={"X-API-Key": extra_key}).status_code == 200
    # Wrong places: a key in the query string, a secret as a wrong key.
    query = {"api_key": edge.api_key, "token": RAY_AUTH_TOKEN}
    assert edge.http.post("/v1/predict", json=predict, params=query).status_code == 401
    wrong = {"Authorization": f"Bearer {MLFLOW_PASSWORD}"}
    assert edge.http.post("/v1/predict", json=predict, headers=wrong).status_code == 401
    mlflow = edge.http.get(
        "/mlflow/api/2.0/mlflow/experiments/search",
        params={"max_results": "1"},
        auth=(edge.settings.mlflow.basic_auth_user, MLFLOW_PASSWORD),
    )
    assert mlflow.status_code == 200
    assert edge.http.get("/mlflow/", auth=("mlflow", UI_PASSWORD)).status_code == 401
    ray_token = {"Authorization": f"Bearer {RAY_AUTH_TOKEN}"}
    assert edge.http.get("/ray/api/jobs/", headers=ray_token).status_code == 200
    assert (
        edge.http.get("/ray/api/jobs/", headers={"Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"}).status_code == 403
    )
    alert = {"version": "4", "status": "resolved", "alerts": []}
    webhook = edge.http.post(
        "/v1/alerts/alertmanager", json=alert, headers={"Authorization": f"Bearer {ALERT_WEBHOOK_TOKEN}"}
    )
    assert webhook.status_code == 200, webhook.text
    ui_login = f"{edge.api_url}/ui/login"
    credentials = {"username": edge.settings.ui.username, "password": UI_PASSWORD}
    assert httpx.post(ui_login, data=credentials, verify=edge.verify, timeout=30).status_code == 200
    wrong_login = {"username": edge.settings.ui.username, "password": edge.api_key}
    assert httpx.post(ui_login, data=wrong_login, verify=edge.verify, timeout=30).status_code == 400


def test_no_secret_in_any_log(edge: Stack, trained: dict[str, Any]) -> None:
    name = f"logs-{uuid.uuid4().hex[:8]}"
    added = run_cli("cluster", "keys", "add", name, "--scopes", "predict,feedback", env=edge.env, timeout=60)
    assert added.returncode == 0, added.stderr
    extra_key = added.stdout.strip()
    assert wait_until(
        lambda: edge.http.get("/v1/models/current", headers={"X-API-Key": extra_key}).status_code == 200,
        3 * edge.settings.api.key_refresh_s + 5,
    )
    marker = f"log-marker-{uuid.uuid4().hex}"
    exercise(edge, extra_key)
    # The last request's id shows up in Nginx's access log and in the replica's log once both are
    # written out (the replica flushes its buffered lines every second).
    last = edge.http.get("/v1/models/current", headers={**edge.auth, "X-Request-ID": marker})
    assert last.status_code == 200
    assert wait_until(lambda: sum(marker in p.read_text(errors="replace") for p in log_files(edge)) >= 2, 15)

    secrets = {
        "API key": edge.api_key,
        "key from `cluster keys add`": extra_key,
        "MLflow password": MLFLOW_PASSWORD,
        "Ray token": RAY_AUTH_TOKEN,
        "UI password": UI_PASSWORD,
        "alert webhook token": ALERT_WEBHOOK_TOKEN,
    }
    files = log_files(edge)
    assert any(p.name == "nginx-access.log" for p in files)
    assert any("serve" in p.parts for p in files), "Ray's Serve logs were not found"
    leaks = [
        f"{what} in {path}"
        for path in files
        for what, secret in secrets.items()
        if secret.encode() in path.read_bytes()
    ]
    assert not leaks, "\n".join(leaks)
