"""A new tabular task is a config file and no code change: a data set the test writes itself."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import train_job


def test_regression_on_a_parquet_data_set(stack, tmp_path):
    rng = np.random.default_rng(0)
    rows = 1200
    frame = pd.DataFrame(
        {
            "Floor Area": rng.uniform(30, 200, rows),
            "Rooms": rng.integers(1, 7, rows),
            "District": rng.choice(["north", "south", "east"], rows),
        }
    )
    bonus = frame["District"].map({"north": 50.0, "south": 0.0, "east": 20.0})
    frame["Price"] = 3.0 * frame["Floor Area"] + 10 * frame["Rooms"] + bonus + rng.normal(0, 5, rows)
    data = tmp_path / "houses.parquet"
    frame.to_parquet(data)
    config = {
        "name": "houses",
        "task": "regression",
        "model_name": "houses-price",
        "data": {"train_uri": str(data), "target": "Price", "test_fraction": 0.2},
        "model": {"hidden": [32]},
        "train": {"num_workers": 2, "epochs": 3, "batch_size": 64, "lr": 0.01},
    }
    result = train_job(stack, config)
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    run = client.get_run(result["run_id"])
    assert {"test_rmse", "test_mae", "test_r2"} <= set(run.data.metrics)
    assert run.data.metrics["test_r2"] > 0.5  # it learned the price, not just the mean
    schema = client.download_artifacts(run.info.run_id, "schema.json")
    features = {f["name"]: f["kind"] for f in yaml.safe_load(Path(schema).read_text())["features"]}
    assert features == {"floor_area": "numeric", "rooms": "numeric", "district": "categorical"}
    assert client.get_model_version_by_alias("houses-price", "champion").version == result["model_version"]


# `make test` trains a CSV classification task with inferred features in tests/e2e/test_second_task.py.
@pytest.mark.extended
def test_classification_on_a_csv_with_inferred_features(stack, tmp_path):
    rng = np.random.default_rng(1)
    rows = 1000
    x = rng.normal(size=rows)
    colour = rng.choice(["red", "green"], rows)
    label = np.where(x + (colour == "red") * 1.5 > 0.7, "buy", "skip")
    path = tmp_path / "shop.csv"
    pd.DataFrame({"score": x, "colour": colour, "decision": label}).to_csv(path, index=False)
    config = {
        "name": "shop",
        "model_name": "shop-decisions",
        "data": {"train_uri": str(path), "target": "decision"},
        "train": {"num_workers": 1, "epochs": 3, "batch_size": 64, "lr": 0.01},
    }
    result = train_job(stack, config)
    assert result["test_metrics"]["roc_auc"] > 0.9
