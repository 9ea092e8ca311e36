"""Batch inference for real: a model registered in a real MLflow store (SQLite, local artifacts),
scored by `jobs.batch_predict` on a local Ray whose object store is smaller than the input; and
the `{"kind": "batch_predict"}` request through the session's stack (API -> queue -> dispatcher ->
Ray job -> job record)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient
from pydantic import SecretStr

from benchmarks.batch_predict import MODEL_NAME, batch_settings, local_ray, register_model, spilled_mib
from cluster.sandbox import Stack, run_cli
from core.health import wait_until
from core.settings import REPO_ROOT, AwsSettings, S3Settings, Settings, get_settings
from jobs.batch_config import BatchConfig, BatchRefusedError
from jobs.batch_predict import EXIT_REFUSED, run_batch
from jobs.config import load_config
from jobs.data.loading import load_splits
from jobs.data.storage import s3_client, s3_filesystem
from jobs.registry import load_predictor
from jobs.result import training_result
from tests.local_http import moto_s3_server
from tests.training_jobs_helpers import post_job, wait_job

pytestmark = pytest.mark.timeout(600)
# The test's own Ray: its object store is far smaller than the large input below.
OBJECT_STORE_MIB = 96
MIB = 1024**2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("batch")


@pytest.fixture(scope="module")
def registry(workdir: Path) -> dict[str, str]:
    """The default Adult network (untrained) registered as version 1, with the champion alias."""
    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"
    version = register_model(tracking_uri, workdir / "artifacts")
    return {"tracking_uri": tracking_uri, "version": version}


@pytest.fixture(scope="module")
def settings(workdir: Path, registry: dict[str, str]) -> Settings:
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    return batch_settings(get_settings(), registry["tracking_uri"], data)


@pytest.fixture(scope="module")
def small_ray() -> Iterator[None]:
    with local_ray(2, OBJECT_STORE_MIB):
        yield
    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def adult() -> pd.DataFrame:
    """Adult's training rows: every category in them is one the model knows."""
    return load_splits(load_config("jobs/configs/adult.yaml")).train


def in_process(registry: dict[str, str], frame: pd.DataFrame) -> pd.DataFrame:
    predictor = load_predictor(f"models:/{MODEL_NAME}/{registry['version']}", registry["tracking_uri"])
    return predictor.predict_frame(frame[predictor.schema.feature_names].reset_index(drop=True))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# A CSV with bad rows -------------------------------------------------------------------------------


BAD = {3: ("age", "abc", "type_error"), 10: ("workclass", "Nope", "unknown_category"), 17: ("hours-per-week", "", None)}


@pytest.fixture(scope="module")
def csv_run(settings: Settings, small_ray: None, adult: pd.DataFrame) -> dict[str, Any]:
    """2,000 Adult rows as CSV with Adult's own column names (`hours-per-week`), an id, and three
    bad cells; scored with the champion."""
    frame = adult.head(2000).rename(columns={"hours_per_week": "hours-per-week", "education_num": "education-num"})
    frame.insert(0, "id", [f"r{i}" for i in range(len(frame))])
    text = frame.astype(object).where(frame.notna(), "")
    for row, (column, value, _) in BAD.items():
        text.loc[row, column] = value
    source = settings.batch_data_dir / "adult.csv"
    text.to_csv(source, index=False)
    config = BatchConfig(model=MODEL_NAME, input="adult.csv", output="scores/adult.parquet")
    outcome = run_batch(config, settings)
    return {"frame": frame, "outcome": outcome, "out": settings.batch_data_dir / "scores"}


def test_every_row_is_scored_or_rejected(csv_run):
    outcome = csv_run["outcome"]
    assert (outcome.rows, outcome.rejected_rows) == (2000 - len(BAD), len(BAD))
    assert outcome.model_name == MODEL_NAME and outcome.model_version == "1"
    assert outcome.output.endswith("scores/adult.parquet") and outcome.rejects.endswith("scores/adult.rejects.parquet")
    out = csv_run["out"]
    assert sorted(p.name for p in out.iterdir()) == ["adult.parquet", "adult.rejects.parquet"]  # no staging left
    marker = json.loads((out / "adult.parquet" / "_SUCCESS").read_text())
    assert marker["rows"] == outcome.rows and marker["run_id"] == outcome.run_id


def test_the_output_has_the_keys_and_the_in_process_predictions(csv_run, registry):
    scored = pd.read_parquet(csv_run["out"] / "adult.parquet")
    assert list(scored.columns) == [
        "id",
        "income",
        "label",
        "probability",
        "probabilities",
        "model_name",
        "model_version",
    ]
    assert set(scored["model_version"]) == {"1"} and set(scored["model_name"]) == {MODEL_NAME}
    frame = csv_run["frame"]
    good = frame.drop(index=list(BAD)).rename(
        columns={"hours-per-week": "hours_per_week", "education-num": "education_num"}
    )
    expected = in_process(registry, good).assign(id=good["id"].to_numpy())
    joined = scored.merge(expected, on="id", suffixes=("", "_expected"))
    assert len(joined) == len(good) == scored["id"].nunique()
    assert (joined["label"] == joined["label_expected"]).all()
    np.testing.assert_allclose(joined["probability"], joined["probability_expected"], rtol=1e-5)
    np.testing.assert_allclose([p[">50K"] for p in joined["probabilities"]], joined["p_>50K"], rtol=1e-5)


def test_the_output_keeps_text_as_text_and_dictionary_encodes_only_it(csv_run):
    # Labels, the model's name and version repeat: a dictionary makes them small; scores hardly
    # repeat, and a dictionary tried on them only costs the writer time.
    files = sorted((csv_run["out"] / "adult.parquet").glob("*.parquet"))
    assert files
    for path in files:
        parquet = pq.ParquetFile(path)
        assert parquet.schema_arrow.field("label").type == pa.string()
        if parquet.metadata.num_rows == 0:
            continue
        group = parquet.metadata.row_group(0)
        encodings = {group.column(i).path_in_schema: set(group.column(i).encodings) for i in range(group.num_columns)}
        for text in ("income", "label", "model_name", "model_version"):
            assert "RLE_DICTIONARY" in encodings[text] or "PLAIN_DICTIONARY" in encodings[text], (text, encodings)
        for score in ("probability", "probabilities.>50K", "probabilities.<=50K"):
            assert not encodings[score] & {"RLE_DICTIONARY", "PLAIN_DICTIONARY"}, (score, encodings)


def test_the_rejects_name_the_row_the_field_and_the_reason(csv_run):
    rejects = pd.read_parquet(csv_run["out"] / "adult.rejects.parquet").sort_values("id")
    frame = csv_run["frame"]
    expected = sorted((frame.loc[row, "id"], column) for row, (column, _, _) in BAD.items())
    found = sorted(zip(rejects["id"], rejects["field"], strict=True))
    # The reject names the model's feature (hours_per_week), read from the column hours-per-week.
    assert found == [(i, c.replace("-", "_")) for i, c in expected]
    reasons = dict(zip(rejects["field"], rejects["reason"], strict=True))
    assert reasons["age"] == "must be a number" and reasons["hours_per_week"] == "may not be null"
    assert reasons["workclass"].startswith("unknown category 'Nope'")
    assert set(rejects["income"]) <= {"<=50K", ">50K"}


def test_the_job_is_an_mlflow_run(csv_run, registry):
    run = MlflowClient(registry["tracking_uri"]).get_run(csv_run["outcome"].run_id)
    params, metrics = run.data.params, run.data.metrics
    assert (params["model"], params["version"]) == (MODEL_NAME, "1")
    assert params["input"].endswith("adult.csv") and params["output"].endswith("scores/adult.parquet")
    assert metrics["rows"] == 2000 - len(BAD) and metrics["rejected_rows"] == len(BAD)
    assert metrics["rows_per_s"] > 0 and metrics["wall_time_s"] > 0
    assert run.data.tags["job.kind"] == "batch_predict" and run.info.status == "FINISHED"


def test_an_existing_output_is_refused_unless_overwritten(csv_run, settings):
    again = BatchConfig(model=f"{MODEL_NAME}/1", input="adult.csv", output="scores/adult.parquet")
    with pytest.raises(BatchRefusedError, match="exists already"):
        run_batch(again, settings)
    outcome = run_batch(again.model_copy(update={"overwrite": True, "keys": ["input_row"]}), settings)
    scored = pd.read_parquet(csv_run["out"] / "adult.parquet")
    assert list(scored.columns[:1]) == ["input_row"] and len(scored) == outcome.rows == 2000 - len(BAD)
    assert sorted(scored["input_row"]) == sorted(set(range(2000)) - set(BAD))
    assert leftovers(csv_run["out"]) == []


# Failing closed ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "why"),
    [
        ("no-such-model", "no registered model named 'no-such-model'"),
        (f"{MODEL_NAME}/99", "has no version 99"),
        (f"{MODEL_NAME}@nobody", "has no version with the alias 'nobody'"),
    ],
)
def test_an_unknown_model_fails_with_nothing_written(settings, csv_run, model, why):
    config = BatchConfig(model=model, input="adult.csv", output="refused/scores.parquet")
    with pytest.raises(BatchRefusedError, match=why):
        run_batch(config, settings)
    assert not (settings.batch_data_dir / "refused").exists()


def test_an_input_without_the_models_features_fails_with_nothing_written(settings, small_ray, adult):
    adult.head(50).drop(columns=["age"]).to_csv(settings.batch_data_dir / "no-age.csv", index=False)
    config = BatchConfig(model=MODEL_NAME, input="no-age.csv", output="no-age/scores.parquet")
    with pytest.raises(BatchRefusedError, match="needs the columns age"):
        run_batch(config, settings)
    assert not (settings.batch_data_dir / "no-age").exists()


def test_a_later_file_that_cannot_be_read_fails_the_job_with_nothing_written(settings, small_ray, adult):
    folder = settings.batch_data_dir / "two-files"
    folder.mkdir()
    adult.head(100).to_parquet(folder / "a.parquet")
    adult.head(100).drop(columns=["age"]).to_parquet(folder / "b.parquet")  # the second lacks a feature
    config = BatchConfig(model=MODEL_NAME, input="two-files", input_format="parquet", output="two/scores.parquet")
    with pytest.raises(BatchRefusedError, match="has no column 'age'"):
        run_batch(config, settings)
    assert list((settings.batch_data_dir / "two").iterdir()) == []


def test_the_command_line_prints_the_refusal_and_exits_4(settings, registry):
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry["tracking_uri"],
        "BATCH_DATA_DIR": str(settings.batch_data_dir),
    }
    command = [sys.executable, "-m", "jobs.batch_predict", "--model", "no-such-model", "--input", "adult.csv"]
    done = subprocess.run(
        [*command, "--output", "cli/scores.parquet"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == EXIT_REFUSED, done.stderr
    result = training_result(done.stdout)
    assert result is not None and result["kind"] == "batch_predict" and "no registered model" in result["error"]
    outside = subprocess.run(
        [*command[:-2], "--input", "/etc/passwd.csv", "--output", "x"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outside.returncode == EXIT_REFUSED and "input: '/etc/passwd.csv' is not inside" in outside.stderr


# Bounded memory -------------------------------------------------------------------------------------


def test_an_input_larger_than_the_object_store_streams_through_it(settings, small_ray, adult, registry):
    """A Parquet file of more than the object store's size, thanks to an incompressible key column;
    the output carries that column too, so writing streams as well as reading."""
    rows, chunk, payload_bytes = 600_000, 50_000, 200
    path = settings.batch_data_dir / "large.parquet"
    rng = np.random.default_rng(1)
    features = adult.drop(columns=["income"])
    payload_type = pa.binary(payload_bytes)
    schema = pa.Table.from_pandas(features.head(1), preserve_index=False).schema.append(
        pa.field("payload", payload_type)
    )
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(rows // chunk):
            sample = features.iloc[rng.integers(0, len(features), chunk)].reset_index(drop=True)
            noise = pa.py_buffer(rng.bytes(chunk * payload_bytes))
            payload = pa.FixedSizeBinaryArray.from_buffers(payload_type, chunk, [None, noise])
            writer.write_table(pa.Table.from_pandas(sample, preserve_index=False).append_column("payload", payload))
    assert path.stat().st_size > 1.2 * OBJECT_STORE_MIB * MIB
    spilled_before = spilled_mib()

    outcome = run_batch(BatchConfig(model=MODEL_NAME, input="large.parquet", output="large-scores"), settings)

    assert (outcome.rows, outcome.rejected_rows) == (rows, 0)
    written = pq.ParquetDataset(settings.batch_data_dir / "large-scores")
    assert sum(f.count_rows() for f in written.fragments) == rows
    assert written.schema.names[:1] == ["payload"]
    # Streaming: blocks went through the store and out again, none had to be spilled to disk.
    assert spilled_mib() - spilled_before < 1


# The object store ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_settings(settings: Settings) -> Iterator[Settings]:
    with moto_s3_server() as url:
        s3 = S3Settings(endpoint_url=url, bucket="batch-test")
        aws = AwsSettings(access_key_id=SecretStr("testing-id"), secret_access_key=SecretStr("testing-secret"))
        yield settings.model_copy(update={"s3": s3, "aws": aws})


def test_an_s3_input_is_scored_into_an_s3_output(s3_settings, small_ray, adult):
    client = s3_client(s3_settings)
    client.create_bucket(Bucket="batch-test")
    body = adult.head(500).drop(columns=["income"]).assign(key=[f"k{i}" for i in range(500)])
    text = body.astype(object).where(body.notna(), "")
    text.loc[9, "workclass"] = "Nope"
    client.put_object(Bucket="batch-test", Key="in/adult.csv", Body=text.to_csv(index=False).encode())

    config = BatchConfig(model=MODEL_NAME, input="s3://batch-test/in/adult.csv", output="s3://batch-test/out/scores")
    outcome = run_batch(config, s3_settings)

    assert (outcome.rows, outcome.rejected_rows) == (499, 1)
    assert outcome.output == "s3://batch-test/out/scores" and outcome.rejects == "s3://batch-test/out/scores.rejects"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="batch-test")["Contents"]]
    assert "out/scores/_SUCCESS" in keys and not [k for k in keys if ".partial" in k]
    fs = s3_filesystem(s3_settings)
    scored = pq.ParquetDataset("batch-test/out/scores", filesystem=fs).read().to_pandas()
    rejects = pq.ParquetDataset("batch-test/out/scores.rejects", filesystem=fs).read().to_pandas()
    assert len(scored) == 499 and set(scored["key"]) == {f"k{i}" for i in range(500)} - {"k9"}
    assert rejects[["key", "field", "error"]].values.tolist() == [["k9", "workclass", "unknown_category"]]
    with pytest.raises(BatchRefusedError, match="names the bucket 'elsewhere'"):
        run_batch(config.model_copy(update={"output": "s3://elsewhere/out"}), s3_settings)


# Through the training-jobs API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def api_input(stack: Stack, adult: pd.DataFrame) -> str:
    folder = stack.settings.batch_data_dir / "api"
    folder.mkdir(parents=True, exist_ok=True)
    adult.head(300).to_parquet(folder / "adult.parquet")
    return "api/adult.parquet"


def test_a_batch_job_runs_through_the_api_and_records_the_run_and_version(stack, trained, api_input):
    output = f"api/scores-{uuid.uuid4().hex[:8]}.parquet"
    # The version the session's first job trained on these rows' split: later tests may promote others.
    model = f"adult-income/{trained['model_version']}"
    body = {"kind": "batch_predict", "overrides": {"model": model, "input": api_input, "output": output}}
    response = post_job(stack, body)
    assert response.status_code == 202, response.text
    done = wait_job(stack, response.json()["id"], {"succeeded"}, timeout_s=300)
    assert done["kind"] == "batch_predict" and done["attempts"] == 1
    assert done["model_name"] == "adult-income" and done["model_version"] == str(trained["model_version"])
    assert done["mlflow_run_id"]
    assert done["promoted"] is None  # it registers and promotes nothing
    assert any(e["message"] and e["message"].startswith("scored 300 rows (0 rejected)") for e in done["events"])
    scored = pd.read_parquet(stack.settings.batch_data_dir / output)
    assert len(scored) == 300 and set(scored["model_version"]) == {done["model_version"]}
    run = MlflowClient(stack.settings.mlflow.tracking_uri).get_run(done["mlflow_run_id"])
    assert run.data.metrics["rows"] == 300


def test_a_batch_job_that_cannot_run_fails_once_without_a_retry(stack, api_input):
    body = {"kind": "batch_predict", "overrides": {"model": "no-such-model", "input": api_input, "output": "api/none"}}
    response = post_job(stack, body)
    assert response.status_code == 202, response.text
    failed = wait_job(stack, response.json()["id"], {"failed"}, timeout_s=300)
    assert failed["attempts"] == 1 and "no registered model named 'no-such-model'" in failed["last_error"]
    assert not (stack.settings.batch_data_dir / "api" / "none").exists()


def test_batch_requests_are_confined_and_restricted_keys_score_only_their_models(stack, api_input):
    for field, value in (("input", "/etc/passwd.csv"), ("output", "../../escape.parquet"), ("input", "s3://x/y.csv")):
        overrides = {"model": "adult-income", "input": api_input, "output": "api/o.parquet", field: value}
        response = post_job(stack, {"kind": "batch_predict", "overrides": overrides})
        assert response.status_code == 422, response.text
        details = response.json()["error"]["details"]
        assert any(d["loc"] == ["body", "overrides", field] for d in details), details
    missing = post_job(stack, {"kind": "batch_predict", "overrides": {"input": api_input, "output": "api/o"}})
    assert missing.status_code == 422 and missing.json()["error"]["details"][0]["loc"][-1] == "model"

    name = f"batch-{uuid.uuid4().hex[:8]}"
    added = run_cli(
        "cluster", "keys", "add", name, "--scopes", "train", "--models", "credit", env=stack.env, timeout=60
    )
    assert added.returncode == 0, added.stderr
    headers = {"Authorization": f"Bearer {added.stdout.strip()}"}
    body = {"kind": "batch_predict", "overrides": {"model": "adult-income", "input": api_input, "output": "api/k"}}

    answers: list[httpx.Response] = []

    def answered() -> bool:  # the new key reaches the replicas within API_KEY_REFRESH_S
        answers.append(stack.http.post("/v1/training-jobs", json=body, headers=headers, timeout=30))
        return answers[-1].status_code != 401

    assert wait_until(answered, 30)
    assert answers[-1].status_code == 403, answers[-1].text
    assert "scores with 'adult-income'" in answers[-1].text
