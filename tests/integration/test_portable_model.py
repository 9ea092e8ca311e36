"""A registered model version is portable: a fresh virtual environment built from the version's own
requirements.txt, with none of the platform installed, loads it with `mlflow.pyfunc.load_model`
and serves it with `mlflow models serve --env-manager local`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from cluster.sandbox import free_port
from core.health import wait_healthy
from jobs.config import DataConfig, JobConfig
from jobs.pyfunc import INFERENCE_MODULES
from jobs.registry import log_and_register
from tests.predictors import untrained_predictor

ROWS = [{"age": 30, "sex": "Female"}, {"age": 61, "sex": "Male"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One version registered in a throwaway registry, downloaded as anyone would fetch it."""
    root = tmp_path_factory.mktemp("portable")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("portable", str(root / "artifacts")))
        rng = np.random.default_rng(0)
        frame = pd.DataFrame({"age": rng.integers(18, 80, 300), "sex": rng.choice(["Female", "Male"], 300)})
        frame["income"] = np.where(frame["age"] > 45, ">50K", "<=50K")
        config = JobConfig(name="portable", data=DataConfig(train_uri="memory", target="income"))
        with mlflow.start_run():
            version = log_and_register(
                untrained_predictor(frame, config), frame, "portable", MlflowClient(mlflow.get_tracking_uri())
            ).version
        path = mlflow.artifacts.download_artifacts(f"models:/portable/{version}", dst_path=str(root / "model"))
    finally:
        mlflow.set_tracking_uri(previous)
    return Path(path)


@pytest.fixture(scope="module")
def bare_env(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with the version's requirements and nothing else."""
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-r", str(model_dir / "requirements.txt")]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=1200, check=False)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return venv


def _outside_the_repo(venv: Path) -> dict[str, str]:
    """The bare environment activated, without anything that would let the platform's packages be
    imported (the test session's own virtual environment has them)."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"}}
    return {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{env.get('PATH', '')}"}


def test_the_version_carries_only_the_inference_modules(model_dir):
    code = sorted(p.name for p in (model_dir / "code" / "jobs").iterdir() if p.suffix == ".py")
    assert code == sorted(["__init__.py", *INFERENCE_MODULES])
    requirements = (model_dir / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} == {"mlflow", "torch", "pandas", "numpy", "pydantic"}


# Building a bare environment (torch included) takes minutes: `make test-extended`; `make test` keeps
# the version's contents (the inference modules only) and import-linter's contract on them.
@pytest.mark.extended
def test_a_bare_environment_loads_and_scores_it(model_dir, bare_env, tmp_path):
    script = f"""
import importlib.util, json, sys
import mlflow.pyfunc, pandas as pd
for name in ("core", "services", "serve_apps", "cluster", "ui", "ray"):
    assert importlib.util.find_spec(name) is None, name + " is importable"
model = mlflow.pyfunc.load_model({str(model_dir)!r})
print(json.dumps(model.predict(pd.DataFrame({ROWS!r})).to_dict(orient="records")))
"""
    ran = subprocess.run(
        [str(bare_env / "bin" / "python"), "-c", script],
        cwd=tmp_path,
        env=_outside_the_repo(bare_env),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    predictions = json.loads(ran.stdout.strip().splitlines()[-1])
    assert [p["label"] in {"<=50K", ">50K"} for p in predictions] == [True, True]
    assert all(abs(p["p_<=50K"] + p["p_>50K"] - 1) < 1e-5 for p in predictions)


@pytest.fixture
def served(model_dir: Path, bare_env: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    argv = [str(bare_env / "bin" / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager", "local"]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=_outside_the_repo(bare_env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        ready = wait_healthy(f"{url}/ping", 180, alive=lambda: server.poll() is None)
        assert ready, (tmp_path / "serve.log").read_text()[-3000:]
        yield url
    finally:
        server.terminate()
        server.wait(30)
        log.close()


@pytest.mark.extended
def test_mlflow_models_serve_answers_from_the_bare_environment(served):
    body = {"dataframe_split": pd.DataFrame(ROWS).to_dict(orient="split")}
    response = httpx.post(f"{served}/invocations", json=body, timeout=60)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 2 and {p["label"] for p in predictions} <= {"<=50K", ">50K"}
