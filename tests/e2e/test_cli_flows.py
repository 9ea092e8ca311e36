"""What a user does from a shell: `ray job submit`, `cluster status`, `cluster up` misconfigured."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cluster.sandbox import PORT_SETTINGS, free_port, run_cli, serve_ingress_overrides
from core.settings import REPO_ROOT
from jobs.result import training_result


def test_status_lists_each_component_healthy(stack, trained):
    result = run_cli("cluster", "status", env=stack.env, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("ray", "mlflow", "serve", "model", "dispatcher", "prometheus", "alertmanager", "postgres-exporter"):
        assert any(line.startswith("up") and f" {name} " in line for line in result.stdout.splitlines()), result.stdout


def test_ray_job_submit_adds_a_model_version(stack, trained):
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    before = {v.version for v in client.search_model_versions("name='adult-income'")}
    ray = str(Path(sys.executable).parent / "ray")
    result = subprocess.run(
        [ray, "job", "submit", "--address", stack.settings.ray.dashboard_url, "--working-dir", ".", "--",
         "python", "-m", "jobs.train", "--config", "jobs/configs/adult.yaml",
         "--set", "train.epochs=1", "--set", "promotion.enabled=false"],
        cwd=REPO_ROOT, env=stack.env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    outcome = training_result(result.stdout)
    assert outcome is not None
    # The session's stack may register versions of its own meanwhile (a retraining its alerts
    # queued): the job's own run is what names the versions it added.
    versions = client.search_model_versions("name='adult-income'")
    added = {v.version: v.run_id for v in versions if v.version not in before}
    assert outcome["model_version"] in added, (outcome, added)
    assert {version for version, run in added.items() if run == outcome["run_id"]} == {outcome["model_version"]}


def _bare_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "API_KEYS": "",  # the environment wins over any developer's .env
            "STATE_DIR": str(tmp_path),
            "RAY_GCS_PORT": str(free_port()),
            # Every port of its own: the session's stack may hold the ones the environment names.
            **{name: str(free_port()) for name in PORT_SETTINGS},
            "MLFLOW_PORT": str(free_port()),
            **serve_ingress_overrides(),
            "DATABASE_URL": "",  # no asynchronous training unless a test asks for it
            "AMQP_URL": "",
        }
    )
    env.update(extra)
    return env


def test_up_without_api_key_fails_with_one_clear_line_and_starts_nothing(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "up"], cwd=tmp_path, env=_bare_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "API_KEYS is not set" in lines[0], result.stderr
    assert not (tmp_path / "pids").exists()


# A second MLflow and Ray head start and stop here, minutes on a small machine: `make test-extended`.
@pytest.mark.extended
def test_failed_up_stops_what_it_started(tmp_path):
    # A Serve config that cannot be deployed: MLflow and Ray start, Serve fails, both are stopped.
    broken = tmp_path / "serve.yaml"
    broken.write_text("applications: [{name: inference, import_path: nowhere.module:app}]\n")
    env = _bare_env(tmp_path, API_KEYS="k", SERVE_CONFIG_PATH=str(broken), RAY_TEMP_DIR=f"/tmp/rtf{free_port()}")
    result = run_cli("cluster", "up", env=env, timeout=400)
    assert result.returncode == 1
    assert "serve: application inference is DEPLOY_FAILED" in result.stderr, result.stderr
    assert not list((tmp_path / "pids").glob("*.pid"))
    assert run_cli("cluster", "status", env=env, timeout=60).returncode == 1


def test_up_with_unreachable_database_names_it(tmp_path):
    env = _bare_env(tmp_path, API_KEYS="k", MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://postgres@127.0.0.1:1/none")
    result = subprocess.run(
        [sys.executable, "-m", "cluster", "up"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    assert "PostgreSQL backend not reachable" in result.stderr and "MLFLOW_BACKEND_STORE_URI" in result.stderr
    assert "Traceback" not in result.stderr


def test_down_is_idempotent_when_nothing_runs(tmp_path):
    env = _bare_env(tmp_path)
    for _ in range(2):
        result = run_cli("cluster", "down", env=env, timeout=60)
        assert result.returncode == 0
        assert "ray: not running" in result.stdout and "mlflow: not running" in result.stdout


def test_up_with_unreachable_broker_names_it_and_starts_nothing(tmp_path):
    env = _bare_env(
        tmp_path,
        API_KEYS="k",
        DATABASE_URL="postgresql://postgres@127.0.0.1:5432/postgres",
        AMQP_URL="amqp://guest:guest@127.0.0.1:1/%2F",
    )
    result = run_cli("cluster", "up", env=env, timeout=120)
    assert result.returncode == 1
    assert "RabbitMQ not reachable" in result.stderr and "AMQP_URL" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not list((tmp_path / "pids").glob("*.pid"))
