"""Batch inference without services: model references, where a job may read and write, the requests
the training-jobs API accepts, the serving path's rules over file columns, the rejects an actor
writes, and the staging that keeps a failed job's files away from its output."""

from __future__ import annotations

import json
import math
import re
import shlex
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.settings import BatchSettings, Settings
from jobs.batch_config import (
    DEFAULT_CONFIG_PATH,
    BatchConfig,
    BatchRefusedError,
    CsvOptions,
    LocationError,
    Locations,
    ModelRef,
    Target,
    load_batch_config,
    plan,
    rejects_target,
)
from jobs.batch_io import (
    STREAM_NAMES,
    BatchInput,
    ReadSpec,
    Staging,
    count_rows,
    csv_pieces,
    ensure_a_file,
    parquet_pieces,
)
from jobs.batch_predict import build_config, reconcile
from jobs.batch_scoring import ModelFiles, Reconciled, Scorer, ScoringSpec
from jobs.config import JobConfig
from jobs.schema import FeatureRules
from jobs.validation import check_table
from serve_apps.errors import install_error_handlers
from serve_apps.validation import RowValidator
from services.dispatcher.core import batch_summary, refusal, wall_time_limit_s
from services.dispatcher.ray_jobs import entrypoint
from services.training_jobs.models import InvalidJobSpecError, JobSpec, ModelNotAllowedError
from services.training_jobs.service import admit_batch
from tests.predictors import untrained_predictor

# Model references ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("adult-income", ModelRef("adult-income", alias="champion")),
        ("adult-income@challenger", ModelRef("adult-income", alias="challenger")),
        ("adult.v2_x@my-alias", ModelRef("adult.v2_x", alias="my-alias")),
        ("adult-income/12", ModelRef("adult-income", version="12")),
    ],
)
def test_a_model_reference_names_an_alias_or_a_version(text, expected):
    assert ModelRef.parse(text) == expected
    assert ModelRef.parse(str(expected)) == expected


def test_a_bare_name_follows_the_configured_alias():
    assert ModelRef.parse("adult", default_alias="prod") == ModelRef("adult", alias="prod")


@pytest.mark.parametrize(
    "text", ["", "adult@", "adult/", "adult/0", "adult/v3", "adult/1@x", "@champion", "../adult", "a b", "a@b@c"]
)
def test_malformed_model_references_are_refused(text):
    with pytest.raises(ValueError, match="not a model reference"):
        ModelRef.parse(text)


# Where a job may read and write ---------------------------------------------------------------------


@pytest.fixture
def locations(tmp_path: Path) -> Locations:
    data = tmp_path / "batch"
    (data / "in").mkdir(parents=True)
    return Locations(data_dir=data, buckets=("scores",))


def test_local_paths_are_taken_inside_the_data_folder(locations):
    root = locations.data_dir.resolve()
    assert locations.resolve("in/a.csv") == Target("file", str(root / "in" / "a.csv"))
    assert locations.resolve(str(root / "in" / "a.csv")).path == str(root / "in" / "a.csv")
    assert locations.resolve(f"file://{root}/out").path == str(root / "out")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("../secrets.csv", "'..'"),
        ("in/../../x.csv", "'..'"),
        ("/etc/passwd", "not inside the batch data folder"),
        ("file:///etc/passwd", "not inside the batch data folder"),
        (".", "not inside the batch data folder"),
        ("in/%2e%2e/x.csv", "percent-encoding"),
        ("http://example.com/a.csv", "'http' scheme"),
        ("hdfs://nn/a.csv", "'hdfs' scheme"),
        ("s3://other/a.csv", "bucket 'other'"),
        ("s3://scores", "not an s3://bucket/key URI"),
        ("s3://scores/a//b.csv", "empty, '.' or '..' path segment"),
        ("s3://scores/a/../b.csv", "empty, '.' or '..' path segment"),
        ("s3://scores/a.csv?versionId=1", "query or a fragment"),
    ],
)
def test_locations_outside_the_configured_ones_are_refused(locations, uri, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        locations.resolve(uri)


def test_a_symlink_out_of_the_data_folder_is_refused(locations, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (locations.data_dir / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="through a symlink"):
        locations.resolve("link/scores.parquet")


def test_s3_needs_a_configured_bucket(tmp_path):
    with pytest.raises(ValueError, match="BATCH_BUCKETS and S3_BUCKET are unset"):
        Locations(data_dir=tmp_path).resolve("s3://scores/a.csv")
    assert Locations(data_dir=tmp_path, buckets=("scores",)).resolve("s3://scores/in/a.csv/") == Target(
        "s3", "scores/in/a.csv"
    )


def test_the_buckets_default_to_the_data_set_bucket(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    for name in ("BATCH_BUCKETS", "BATCH_DATA_DIR", "S3_BUCKET", "STATE_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("S3_BUCKET", "datasets")
    settings = Settings()
    assert settings.batch_buckets == ["datasets"]
    assert settings.batch_data_dir == settings.state_dir / "batch"
    monkeypatch.setenv("BATCH_BUCKETS", "in-bucket, out-bucket")
    monkeypatch.setenv("BATCH_DATA_DIR", "/srv/batch")
    settings = Settings()
    assert settings.batch_buckets == ["in-bucket", "out-bucket"] and settings.batch_data_dir == Path("/srv/batch")


def config(**values) -> BatchConfig:
    return BatchConfig(**{"model": "adult-income", "input": "in/a.csv", "output": "out/scores.parquet", **values})


def test_a_plan_names_the_rejects_next_to_the_output(locations):
    where = plan(config(), locations)
    root = locations.data_dir.resolve()
    assert where.format == "csv" and where.output.path == str(root / "out" / "scores.parquet")
    assert where.rejects.path == str(root / "out" / "scores.rejects.parquet")
    assert rejects_target(Target("s3", "b/out/scores")) == Target("s3", "b/out/scores.rejects")


@pytest.mark.parametrize(
    ("values", "field", "why"),
    [
        ({"model": None}, "model", "required"),
        ({"output": None}, "output", "required"),
        ({"input": "/etc/passwd.csv"}, "input", "not inside"),
        ({"output": "s3://elsewhere/out"}, "output", "bucket 'elsewhere'"),
        ({"input": "in/data"}, "input", "set input_format"),
        ({"input": "in", "input_format": "csv", "output": "in/scores"}, "output", "overlaps the input"),
        ({"input": "out/scores.rejects.parquet/x.parquet"}, "output", "overlaps the input"),
    ],
)
def test_a_plan_names_the_field_at_fault(locations, values, field, why):
    with pytest.raises(LocationError) as info:
        plan(config(**values), locations)
    assert info.value.field == field and why in info.value.message


# The config and the request -----------------------------------------------------------------------


def test_the_shipped_defaults_need_a_model_an_input_and_an_output():
    shipped = load_batch_config()
    assert shipped.missing() == ["model", "input", "output"]
    assert shipped.with_overrides({"csv.null_values": ["?"]}).csv.null_values == ["?"]


def test_the_command_lines_flags_win_over_set_and_the_file():
    built = build_config(
        DEFAULT_CONFIG_PATH,
        ["model=a@x", "input=in/a.parquet", "keys=[id]"],
        "b/2",
        None,
        "out/s",
        None,
    )
    assert (built.model, built.input, built.output, built.keys) == ("b/2", "in/a.parquet", "out/s", ["id"])


def batch_spec(**overrides) -> JobSpec:
    values = {"model": "adult-income", "input": "in/a.csv", "output": "out/scores.parquet", **overrides}
    return JobSpec(kind="batch_predict", overrides={k: v for k, v in values.items() if v is not None})


def test_a_batch_spec_uses_the_batch_config_and_module():
    spec = batch_spec()
    assert spec.config_name == "batch-predict" and spec.config_path.parent.name == "batch"
    assert spec.module == "jobs.batch_predict"
    argv = shlex.split(entrypoint(spec))
    assert argv[:5] == ["python", "-m", "jobs.batch_predict", "--config", "jobs/configs/batch/batch-predict.yaml"]
    assert json.loads(dict(a.split("=", 1) for a in argv[6::2])["output"]) == "out/scores.parquet"
    # The same overrides as a training job are another request.
    assert spec.fingerprint() != JobSpec(kind="train", overrides=spec.overrides).fingerprint()
    with pytest.raises(InvalidJobSpecError):
        spec.resolve()


@pytest.mark.parametrize(
    ("overrides", "loc"),
    [
        ({"model": None}, ["body", "overrides", "model"]),
        ({"model": "adult@"}, ["body", "overrides", "model"]),
        ({"batch_size": 0}, ["body", "overrides", "batch_size"]),
        ({"keys": ["id", "id"]}, ["body", "overrides", "keys"]),
        ({"no_such_knob": 1}, ["body", "overrides", "no_such_knob"]),
        ({"input_format": "xlsx"}, ["body", "overrides", "input_format"]),
    ],
)
def test_an_invalid_batch_request_names_the_override(overrides, loc):
    with pytest.raises(InvalidJobSpecError) as info:
        batch_spec(**overrides).resolve_batch()
    assert info.value.loc == loc


def test_admission_confines_the_locations_for_everyone_and_caps_actors_for_non_admins(locations):
    limits = BatchSettings(max_actors=4)
    assert admit_batch(batch_spec(), admin=False, limits=limits, locations=locations).model == "adult-income"
    for field, value in (("input", "/etc/hosts.csv"), ("output", "s3://elsewhere/x")):
        for admin in (False, True):
            with pytest.raises(InvalidJobSpecError) as info:
                admit_batch(batch_spec(**{field: value}), admin=admin, limits=limits, locations=locations)
            assert info.value.loc == ["body", "overrides", field] and "batch jobs use only" in info.value.message
    with pytest.raises(InvalidJobSpecError) as info:
        admit_batch(batch_spec(actors=5), admin=False, limits=limits, locations=locations)
    assert info.value.loc == ["body", "overrides", "actors"] and "BATCH_MAX_ACTORS" in info.value.message
    assert admit_batch(batch_spec(actors=5), admin=True, limits=limits, locations=locations).actors == 5


def test_a_key_restricted_to_models_is_told_which_it_may_score_with():
    message = str(ModelNotAllowedError("credit", frozenset({"adult-income"}), scores=True))
    assert message == "this API key may only use the models adult-income; the job scores with 'credit'"


@pytest.mark.parametrize(
    ("scores", "loc"), [(True, ["body", "overrides", "model"]), (False, ["body", "config"])], ids=["batch", "train"]
)
def test_a_refused_model_is_answered_where_the_request_names_it(scores, loc):
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/training-jobs")
    def submit() -> None:
        raise ModelNotAllowedError("credit", frozenset({"adult-income"}), scores=scores)

    response = TestClient(app).post("/v1/training-jobs")
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "model_not_allowed"
    assert error["details"] == [
        {"loc": loc, "msg": error["message"], "type": "model_not_allowed", "ctx": {"model": "credit"}}
    ]


# The dispatcher's side ------------------------------------------------------------------------------


def test_a_refused_batch_job_ends_without_a_retry_and_keeps_what_it_knew():
    result = {"kind": "batch_predict", "error": "model: 'x' has no version 9", "model_name": "x"}
    outcome = refusal(result)
    assert outcome is not None and outcome.status == "refused" and "has no version 9" in outcome.error
    summary = batch_summary({"rows": 10, "rejected_rows": 2, "model_name": "m", "model_version": "3", "output": "o"})
    assert summary.startswith("scored 10 rows (2 rejected) with m version 3 into o")
    assert wall_time_limit_s(Settings().dispatcher, "batch_predict", BatchSettings(max_wall_time_s=60)) == 60


# The serving path's rules, over file columns -------------------------------------------------------


@pytest.fixture(scope="module")
def predictor():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, 200).astype(float),
            "hours": rng.integers(1, 80, 200).astype(float),
            "workclass": rng.choice(["Private", "State-gov", "Self-emp"], 200),
            "income": rng.choice(["<=50K", ">50K"], 200),
        }
    )
    frame.loc[::7, "hours"] = np.nan  # a nullable numeric feature
    job = JobConfig.model_validate({"name": "t", "data": {"train_uri": "unused.csv", "target": "income"}})
    return untrained_predictor(frame, job)


VALUES: list[Any] = [None, 0, 1, -3.5, 1e308, True, False, "39", "", "x", "Private", "private", [], {}, float("nan")]
VALUES += [float("inf"), -float("inf"), 10**400, "Self-emp", "a" * 100]


def test_the_value_rule_is_the_serving_paths(predictor):
    schema = predictor.schema
    serving = RowValidator(schema)
    rules = FeatureRules(schema)
    valid = {f.name: f.categories[0] if f.kind == "categorical" else 1.0 for f in schema.features}
    for name in schema.feature_names:
        for value in VALUES:
            verdict = rules.check_value(name, value)
            # What a request with this value is told, naming the row and the field.
            expected = (
                []
                if verdict is None
                else [{"loc": ["body", "instances", 0, name], "msg": verdict[1], "type": verdict[0]}]
            )
            assert serving.errors([{**valid, name: value}]) == expected, (name, value)
    assert rules.check_value("age", True) == ("type_error", "must be a number")
    assert rules.check_value("age", None) == ("null_forbidden", "may not be null")
    assert rules.check_value("hours", None) is None
    unknown = rules.check_value("workclass", "private")
    assert unknown is not None and unknown[0] == "unknown_category"


def column_check(predictor, columns: dict[str, Any], text_numbers: bool):
    table = pa.table(columns)
    return check_table(
        FeatureRules(predictor.schema), {n: table.column(n) for n in columns}, table.num_rows, text_numbers
    )


def test_csv_text_is_read_as_the_request_would_send_it(predictor):
    check = column_check(
        predictor,
        {
            "age": ["39", "abc", "nan", "1e999", None, " 40 ", "41"],
            "hours": ["10", "11", "12", "13", "14", None, "15"],
            "workclass": ["Private", "Private", "Private", "Private", "Private", "Private", "Nope"],
        },
        text_numbers=True,
    )
    assert check.accepted.tolist() == [True, False, False, False, False, True, False]
    assert check.refused_rows.tolist() == [1, 2, 3, 4, 6]
    assert check.first_field == ["age", "age", "age", "age", "workclass"]
    assert check.first_error == ["type_error", "value_error", "value_error", "null_forbidden", "unknown_category"]
    assert check.first_reason[0] == "must be a number"
    assert check.first_reason[4].startswith("unknown category 'Nope'; expected one of: Private")
    assert check.features["age"].tolist() == [39.0, 40.0]
    # Categories as the preprocessing codes them: 1-based in the schema's order, 0 for null.
    categories = next(f.categories for f in predictor.schema.features if f.name == "workclass")
    assert check.features["workclass"].tolist() == [categories.index("Private") + 1] * 2
    hours = check.features["hours"]
    assert hours[0] == 10.0 and math.isnan(hours[1])  # a null of a nullable feature is missing, not refused


def test_every_field_at_fault_is_listed_the_first_in_feature_order(predictor):
    check = column_check(predictor, {"age": [None], "hours": [float("inf")], "workclass": ["Nope"]}, text_numbers=False)
    order = [n for n in predictor.schema.feature_names if n in {"age", "hours", "workclass"}]
    assert check.fields == [order] and check.first_field == [order[0]]


def test_typed_columns_follow_the_same_rules(predictor):
    check = column_check(
        predictor,
        {
            "age": pa.array([30, 2**60, None], pa.int64()),
            "hours": [1.0, float("nan"), 2.0],
            "workclass": ["Private"] * 3,
        },
        text_numbers=False,
    )
    assert check.first_error == ["value_error", "null_forbidden"]  # a NaN is no null; a null age may not be
    with pytest.raises(ValueError, match="is numeric"):
        column_check(predictor, {"age": ["30"], "hours": [1.0], "workclass": ["Private"]}, text_numbers=False)


def test_dictionary_encoded_text_is_checked_as_its_text(predictor):
    """Parquet's categorical columns are read dictionary-encoded: the same codes, refusals and reasons."""
    workclass = ["Private", None, "Nope", "State-gov", "Private", "private", None, "Self-emp"]
    plain = {"age": [30.0] * 8, "hours": [1.0] * 8, "workclass": workclass}
    chunks = [pa.array(workclass[:3]).dictionary_encode(), pa.array(workclass[3:]).dictionary_encode()]
    assert chunks[0].dictionary != chunks[1].dictionary  # each batch has its own dictionary
    encoded = {**plain, "workclass": pa.chunked_array(chunks)}
    expected = column_check(predictor, plain, text_numbers=False)
    found = check_table(
        FeatureRules(predictor.schema),
        {name: pa.chunked_array([pa.array(v)]) if name != "workclass" else v for name, v in encoded.items()},
        8,
    )
    assert found.refused_rows.tolist() == expected.refused_rows.tolist() == [1, 2, 5, 6]
    assert (found.first_error, found.first_reason) == (expected.first_error, expected.first_reason)
    assert found.features["workclass"].tolist() == expected.features["workclass"].tolist()


# Reconciling an input with the model ------------------------------------------------------------------


def test_the_input_is_reconciled_with_the_model(predictor):
    text = pa.schema([pa.field(n, pa.string()) for n in ("id", "Age", "hours", "workclass", "income")])
    matched = reconcile(predictor.schema, text, None, text_numbers=True)
    assert matched.features["age"] == "Age" and matched.keys == ("id", "income")
    assert matched.output_schema.names == ["id", "income", "label", "probability", "probabilities", *MODEL]
    assert matched.rejects_schema.names == ["id", "income", "field", "error", "reason", "fields"]
    only_features = pa.schema([pa.field(n, pa.string()) for n in ("age", "hours", "workclass")])
    assert reconcile(predictor.schema, only_features, None, text_numbers=True).keys == ("input_file", "input_row")


MODEL = ["model_name", "model_version"]


@pytest.mark.parametrize(
    ("names", "keys", "why"),
    [
        (("age", "hours"), None, "needs the columns workclass"),
        (("age", "hours", "workclass", "label"), None, "'label' has the name of an output"),
        (("age", "hours", "workclass"), ["nope"], "has no column 'nope'"),
        (("Age", "AGE", "hours", "workclass"), None, "all read as the feature 'age'"),
    ],
)
def test_an_input_the_model_cannot_read_is_refused(predictor, names, keys, why):
    schema = pa.schema([pa.field(n, pa.string()) for n in names])
    with pytest.raises(BatchRefusedError, match=re.escape(why)):
        reconcile(predictor.schema, schema, keys, text_numbers=True)


def test_a_parquet_column_of_the_wrong_type_is_refused_before_the_job_starts(predictor):
    schema = pa.schema([("age", pa.string()), ("hours", pa.float64()), ("workclass", pa.string())])
    with pytest.raises(BatchRefusedError, match="the column 'age' is string"):
        reconcile(predictor.schema, schema, None, text_numbers=False)


# The scorer: predictions and rejects ----------------------------------------------------------------


def scorer(predictor, matched: Reconciled, folder: Path) -> Scorer:
    """A scorer built as an actor is: from the model's files, loaded in its constructor."""
    spec = ScoringSpec(
        model=ModelFiles.read(predictor.save(folder / "model")),
        model_name="t",
        model_version="1",
        reconciled=matched,
        rejects_folder=str(folder),
        filesystem=pafs.LocalFileSystem(),
        torch_threads=torch.get_num_threads(),
    )
    return Scorer(spec)


def input_batch(columns: dict[str, list[Any]]) -> pa.Table:
    rows = len(next(iter(columns.values())))
    table = pa.table({name: pa.array(values, pa.string()) for name, values in columns.items()})
    table = table.append_column(STREAM_NAMES["input_file"], pa.array(["a.csv"] * rows))
    return table.append_column(STREAM_NAMES["input_row"], pa.array(range(100, 100 + rows), pa.int64()))


def test_the_scorer_predicts_accepted_rows_and_writes_the_refused_ones_with_their_key(predictor, tmp_path):
    columns: dict[str, list[Any]] = {
        "id": ["a", "b", "c", "d", "e"],
        "age": ["30", "x", "50", "60", None],
        "hours": ["40", "40", None, "20", "10"],
        "workclass": ["Private", "Private", "State-gov", "Nope", "Self-emp"],
    }
    schema = pa.schema([pa.field(n, pa.string()) for n in columns])
    matched = reconcile(predictor.schema, schema, ["id", "input_row"], text_numbers=True)
    out = scorer(predictor, matched, tmp_path)(input_batch(columns))

    assert out.schema == matched.output_schema
    assert out.column("id").to_pylist() == ["a", "c"] and out.column("input_row").to_pylist() == [100, 102]
    expected = predictor.predict_frame(
        pd.DataFrame({"age": [30.0, 50.0], "hours": [40.0, np.nan], "workclass": ["Private", "State-gov"]})
    )
    assert out.column("label").to_pylist() == expected["label"].tolist()
    np.testing.assert_allclose(out.column("probability").to_numpy(), expected["probability"], rtol=1e-6)
    probabilities = pd.DataFrame(out.column("probabilities").to_pylist())
    np.testing.assert_allclose(probabilities[">50K"], expected["p_>50K"], rtol=1e-6)
    assert set(out.column("model_version").to_pylist()) == {"1"}

    (written,) = list(tmp_path.glob("rejects-*.parquet"))
    rejects = pq.read_table(written).to_pylist()
    assert [(r["id"], r["input_row"], r["field"], r["error"]) for r in rejects] == [
        ("b", 101, "age", "type_error"),
        ("d", 103, "workclass", "unknown_category"),
        ("e", 104, "age", "null_forbidden"),
    ]
    assert rejects[0]["reason"] == "must be a number" and rejects[1]["fields"] == ["workclass"]
    # The same batch again (Ray retries a batch whose actor died) writes the same file, once.
    scorer(predictor, matched, tmp_path)(input_batch(columns))
    assert list(tmp_path.glob("rejects-*.parquet")) == [written]


def test_a_batch_without_valid_rows_gives_an_empty_output(predictor, tmp_path):
    columns: dict[str, list[Any]] = {"age": ["x"], "hours": ["1"], "workclass": ["Private"]}
    matched = reconcile(predictor.schema, pa.schema([(n, pa.string()) for n in columns]), None, text_numbers=True)
    out = scorer(predictor, matched, tmp_path)(input_batch(columns))
    assert out.num_rows == 0 and out.schema == matched.output_schema
    assert count_rows(pafs.LocalFileSystem(), str(tmp_path)) == 1


# Staging: nothing at the output until the job commits -----------------------------------------------


def test_staging_commits_both_folders_or_leaves_nothing(tmp_path):
    fs = pafs.LocalFileSystem()
    output, rejects = (
        Target("file", str(tmp_path / "scores.parquet")),
        Target("file", str(tmp_path / "scores.rejects.parquet")),
    )
    schema = pa.schema([("id", pa.string())])

    failed = Staging.next_to(output, rejects)
    failed.prepare(fs)
    ensure_a_file(fs, failed.staged_output, schema, "part-0.parquet")
    failed.discard(fs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []

    staging = Staging.next_to(output, rejects)
    staging.refuse_existing(fs, overwrite=False)
    staging.prepare(fs)
    pq.write_table(pa.table({"id": ["a", "b"]}), f"{staging.staged_output}/part-0.parquet")
    ensure_a_file(fs, staging.staged_rejects, schema, "rejects-empty.parquet")
    staging.commit(fs, {"rows": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.rejects.parquet"]
    assert pd.read_parquet(tmp_path / "scores.parquet")["id"].tolist() == ["a", "b"]
    assert json.loads((tmp_path / "scores.parquet" / "_SUCCESS").read_text())["rows"] == 2
    assert len(pd.read_parquet(tmp_path / "scores.rejects.parquet")) == 0

    with pytest.raises(BatchRefusedError, match="exists already"):
        Staging.next_to(output, rejects).refuse_existing(fs, overwrite=False)
    again = Staging.next_to(output, rejects)
    again.prepare(fs)
    pq.write_table(pa.table({"id": ["c"]}), f"{again.staged_output}/part-0.parquet")
    ensure_a_file(fs, again.staged_rejects, schema, "rejects-empty.parquet")
    again.commit(fs, {"rows": 1})
    assert pd.read_parquet(tmp_path / "scores.parquet")["id"].tolist() == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.rejects.parquet"]


# Reading in pieces: bounded tasks with exact row ids ----------------------------------------------


def read_all(pieces, spec_format: str, columns: tuple[str, ...], tmp_path: Path) -> pd.DataFrame:
    spec = ReadSpec(Target("file", str(tmp_path)), spec_format, columns, CsvOptions(), 2)  # type: ignore[arg-type]
    source = BatchInput(pieces, pafs.LocalFileSystem(), spec)
    tables = [table for task in source.get_read_tasks(1) for table in task()]
    if not tables:
        return pd.DataFrame()
    frame = pa.concat_tables(tables).to_pandas()
    return frame.rename(columns={STREAM_NAMES["input_file"]: "file", STREAM_NAMES["input_row"]: "row"})


def test_csv_pieces_are_cut_at_line_breaks_and_number_their_rows(tmp_path):
    lines = [f"{i},name {i}" for i in range(50)]
    lines[7] = ""  # a blank line is no row, but it is a line: the rows after it keep their numbers
    lines[20] = "20,\r"  # a CRLF line whose name is empty
    path = tmp_path / "a.csv"
    path.write_bytes(("id,name\n" + "\n".join(lines)).encode())  # no line break after the last line
    pieces = csv_pieces(pafs.LocalFileSystem(), str(path), target_bytes=60)
    assert len(pieces) > 5 and all(p.header == b"id,name\n" for p in pieces)
    assert [p.first_row for p in pieces] == sorted({p.first_row for p in pieces})
    frame = read_all(pieces, "csv", ("id", "name"), tmp_path)
    expected = [i for i in range(50) if i != 7]
    assert frame["id"].astype(int).tolist() == expected and frame["row"].tolist() == expected
    assert set(frame["file"]) == {"a.csv"}
    assert (
        frame.loc[frame["id"] == "20", "name"].isna().all()
        and frame.loc[frame["id"] == "49", "name"].item() == "name 49"
    )


def test_a_compressed_csv_is_one_piece_with_the_same_row_numbers(tmp_path):
    import gzip

    path = tmp_path / "a.csv.gz"
    path.write_bytes(gzip.compress(b"id\n" + b"".join(f"{i}\n".encode() for i in range(30)) + b"\n\n30\n"))
    pieces = csv_pieces(pafs.LocalFileSystem(), str(path), target_bytes=10)
    assert len(pieces) == 1
    frame = read_all(pieces, "csv", ("id",), tmp_path)
    assert frame["row"].tolist() == [*range(30), 32]


def test_a_quoted_line_break_fails_the_job_instead_of_a_row(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text('id,note\n1,"two\nlines"\n2,fine\n')
    with pytest.raises(BatchRefusedError, match="quoted value with a line break"):
        read_all(csv_pieces(pafs.LocalFileSystem(), str(path), target_bytes=1 << 20), "csv", ("id", "note"), tmp_path)


def test_parquet_pieces_group_row_groups_and_number_rows(tmp_path):
    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": list(range(100))}), path, row_group_size=10)
    pieces = parquet_pieces(pafs.LocalFileSystem(), str(path), target_bytes=200)
    assert len(pieces) > 1 and sum(p.rows or 0 for p in pieces) == 100
    assert [g for p in pieces for g in p.row_groups] == list(range(10))
    frame = read_all(pieces, "parquet", ("id",), tmp_path)
    assert frame["id"].tolist() == frame["row"].tolist() == list(range(100))
    text = tmp_path / "text.parquet"
    pq.write_table(pa.table({"kind": ["a", "b", None, "a"]}), text)
    spec = ReadSpec(Target("file", str(tmp_path)), "parquet", ("kind",), CsvOptions(), 2, ("kind",))
    (task,) = BatchInput(
        parquet_pieces(pafs.LocalFileSystem(), str(text), 200), pafs.LocalFileSystem(), spec
    ).get_read_tasks(1)
    tables = list(task())
    assert all(pa.types.is_dictionary(t.schema.field("kind").type) for t in tables)
    assert [v for t in tables for v in t.column("kind").to_pylist()] == ["a", "b", None, "a"]
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.int64())}), empty)
    assert read_all(parquet_pieces(pafs.LocalFileSystem(), str(empty), 200), "parquet", ("id",), tmp_path).empty
