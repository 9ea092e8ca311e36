"""The benchmark's peer servers on a small model: `mlflow models serve` and the bare FastAPI server
start, answer wrk without errors, agree with each other and with the model in process, and stop.

No stack: the model is fitted here in seconds and registered in a file-based MLflow (SQLite plus a
local artifact directory), as the peers would take it from the platform's registry.
"""

from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from benchmarks.load import run_wrk
from benchmarks.peers import fastapi_peer, in_process, mlflow_peer, sample_rows
from jobs.config import load_config
from jobs.data.loading import load_splits
from jobs.predictor import Architecture, TabularPredictor
from jobs.preprocess import Preprocessor
from jobs.registry import log_and_register
from jobs.schema import build_schema

pytestmark = [pytest.mark.extended, pytest.mark.timeout(180)]
MODEL_NAME = "bench-peers"


@dataclass
class Registered:
    uri: str
    tracking_uri: str
    predictor: TabularPredictor


def quick_predictor(rows: int = 3000, steps: int = 30) -> tuple[TabularPredictor, pd.DataFrame]:
    """A small MLP fitted full-batch on a slice of Adult: enough for labels that are not all one class."""
    config = load_config("jobs/configs/adult.yaml")
    train = load_splits(config).train.head(rows)
    pre = Preprocessor.fit(train, build_schema(train, config))
    arch = Architecture(
        cardinalities=pre.cardinalities,
        n_numeric=pre.n_numeric,
        n_outputs=pre.n_outputs,
        hidden=[32, 16],
        dropout=0.0,
        max_embedding_dim=8,
    )
    torch.manual_seed(0)
    module = arch.build()
    enc = pre.encode(train)
    x_cat, x_num = torch.from_numpy(enc.x_cat), torch.from_numpy(enc.x_num)
    y = torch.from_numpy(pre.encode_target(train))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(module(x_cat, x_num), y).backward()
        optimizer.step()
    return TabularPredictor(pre, arch, module), train


def register(predictor: TabularPredictor, example: pd.DataFrame, directory: Path) -> Registered:
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    # The test process's tracking URI is restored afterwards: other tests use their own.
    with _use_tracking_uri(tracking_uri):
        experiment = mlflow.create_experiment(MODEL_NAME, artifact_location=(directory / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=experiment):
            version = log_and_register(predictor, example, MODEL_NAME, MlflowClient(tracking_uri))
    return Registered(f"models:/{MODEL_NAME}/{version.version}", tracking_uri, predictor)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    predictor, train = quick_predictor()
    return register(predictor, train, tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def rows():
    return sample_rows(40, seed=1)


def test_peers_agree_and_take_load_without_errors(registered, rows, tmp_path):
    expected = list(registered.predictor.predict_frame(pd.DataFrame.from_records(rows))["label"])
    assert len(set(expected)) > 1, "the quick model should not predict a single class"
    logs = tmp_path / "logs"
    pids = []
    with (
        fastapi_peer(registered.uri, logs, tracking_uri=registered.tracking_uri) as bare,
        mlflow_peer(registered.uri, logs, tracking_uri=registered.tracking_uri) as served,
    ):
        for peer in (bare, served):
            pids.append(peer.process.pid)
            assert peer.labels(rows) == expected, peer.name
            result = run_wrk(peer.url, peer.body(rows[:1]), peer.headers, connections=2, duration_s=1)
            assert result.requests > 0, peer.name
            assert result.error_count == 0, (peer.name, result.errors_by_kind)
            assert result.loadgen is not None and result.loadgen.cpu_s > 0
    assert (logs / "mlflow.log").is_file() and (logs / "fastapi.log").is_file()
    assert not any(psutil.pid_exists(pid) for pid in pids), "a peer outlived its context"


def test_in_process_measures_both_batch_sizes(registered, rows):
    measured = in_process(registered.uri, rows, iterations=5, sizes=(1, 100), tracking_uri=registered.tracking_uri)
    assert [r["rows"] for r in measured["results"]] == [1, 100]
    for result in measured["results"]:
        assert result["calls_per_s"] > 0 and result["p99_ms"] >= result["p50_ms"] > 0
