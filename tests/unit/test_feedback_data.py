"""Feedback snapshots as training data: exported as the dispatcher writes them, read back by the
training job, checked against their sha256, split by the time of their labels, and cleaned and
typed like the data set's own rows."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from core.settings import Settings
from jobs.config import JobConfig, load_config
from jobs.data.loading import Splits, load_splits
from jobs.feedback_data import TIME_COLUMN, SnapshotDigestError, read_snapshot, split_by_time, with_feedback
from jobs.preprocess import Preprocessor
from jobs.schema import build_schema
from services.dispatcher.snapshots import parquet_bytes, snapshot_frame, snapshot_uri

START = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def adult() -> tuple[JobConfig, Splits]:
    config = load_config("jobs/configs/adult.yaml")
    return config, load_splits(config)


def _recorded(row: pd.Series) -> dict[str, Any]:
    """A row as the serving API records it: its JSON, every feature, no target."""
    return json.loads(row.drop(labels=["income"]).to_json())


def _snapshot(tmp_path: Path, rows: list[tuple[dict[str, Any], str, datetime]]) -> tuple[str, str]:
    data = parquet_bytes(snapshot_frame(rows, "income"))
    path = tmp_path / "snapshot.parquet"
    path.write_bytes(data)
    return str(path), hashlib.sha256(data).hexdigest()


def _labelled(splits: Splits, count: int, offset_minutes: int = 0) -> list[tuple[dict[str, Any], str, datetime]]:
    rows = splits.test.iloc[:count]
    return [
        (_recorded(row), str(row["income"]), START + timedelta(minutes=offset_minutes + i))
        for i, (_, row) in enumerate(rows.iterrows())
    ]


def _with(config: JobConfig, uri: str, sha256: str | None, **feedback: Any) -> JobConfig:
    overrides: dict[str, Any] = {"data.feedback_uri": uri, "data.feedback_sha256": sha256}
    overrides |= {f"feedback.{key}": value for key, value in feedback.items()}
    return config.with_overrides(overrides)


def test_the_most_recent_labels_are_held_out_whatever_the_order_of_the_file():
    times = [START + timedelta(minutes=m) for m in (5, 1, 9, 3, 7, 2, 8, 0, 6, 4)]
    frame = pd.DataFrame({"x": range(10), TIME_COLUMN: times})
    older, recent = split_by_time(frame, 0.3)
    assert recent["x"].tolist() == [4, 6, 2]  # labelled at minutes 7, 8, 9
    assert older["x"].tolist() == [7, 1, 5, 3, 9, 0, 8]  # minutes 0..6, oldest first
    assert split_by_time(frame, 0.0)[1].empty
    # A slice asked for is never silently empty.
    assert len(split_by_time(frame.iloc[:2], 0.1)[1]) == 1


def test_older_feedback_joins_training_and_the_recent_slice_is_never_trained_on(adult, tmp_path):
    config, splits = adult
    rows = _labelled(splits, 100)
    uri, sha256 = _snapshot(tmp_path, rows)
    merged = with_feedback(splits, _with(config, uri, sha256, holdout_fraction=0.3), None)

    assert merged.recent is not None and merged.feedback is not None
    assert len(merged.recent) == 30 and len(merged.feedback) == 100
    # The 70 older rows train, a val_fraction share of them validates; the test split is untouched.
    validating = round(70 * config.data.val_fraction)
    assert len(merged.train) == len(splits.train) + 70 - validating
    assert len(merged.val) == len(splits.val) + validating and len(merged.test) == len(splits.test)
    # The recent slice is the last 30 labelled rows, and none of them is trained or validated on.
    newest = splits.test.iloc[70:100].reset_index(drop=True)
    assert merged.recent["fnlwgt"].tolist() == newest["fnlwgt"].tolist()
    added = [*merged.train.iloc[len(splits.train) :]["fnlwgt"], *merged.val.iloc[len(splits.val) :]["fnlwgt"]]
    assert sorted(added) == sorted(splits.test["fnlwgt"].iloc[:70].tolist())
    # The snapshot is part of the data set's version.
    assert merged.sources["feedback"] == uri and merged.digests[uri] == sha256
    assert set(splits.digests) < set(merged.digests)


def test_feedback_rows_look_like_the_data_sets_own(adult, tmp_path):
    config, splits = adult
    rows = _labelled(splits, 60)
    # A missing value as the API records it, a feature the job does not use, and a label written
    # as the raw test split writes it (trailing dot): cleaned like the data set's rows.
    rows[0][0]["workclass"] = None
    rows[1][0]["legacy_feature"] = 1
    rows[2] = (rows[2][0], ">50K.", rows[2][2])
    uri, sha256 = _snapshot(tmp_path, rows)
    merged = with_feedback(splits, _with(config, uri, sha256, holdout_fraction=0.2), None)

    assert merged.feedback is not None
    assert list(merged.feedback.columns) == list(splits.train.columns)
    assert merged.train.dtypes.to_dict() == splits.train.dtypes.to_dict()
    assert set(merged.feedback["income"]) <= {"<=50K", ">50K"}
    assert merged.feedback["income"].iloc[2] == ">50K"
    assert pd.isna(merged.feedback["workclass"].iloc[0])
    # The schema and the preprocessor fit on the merged split as on the data set alone.
    schema = build_schema(merged.train, config)
    alone = build_schema(splits.train, config)
    assert [f.name for f in schema.features] == [f.name for f in alone.features]
    assert [f.kind for f in schema.features] == [f.kind for f in alone.features]
    assert schema.classes == alone.classes == ["<=50K", ">50K"]
    assert merged.recent is not None
    pre = Preprocessor.fit(merged.train, schema)
    encoded = pre.to_columns(merged.recent)
    assert len(encoded) == len(merged.recent) and np.isfinite(encoded.to_numpy(dtype=float)).all()


def test_a_label_the_data_set_does_not_know_never_adds_a_class(adult, tmp_path):
    config, splits = adult
    rows = _labelled(splits, 50)
    rows[10] = (rows[10][0], "unknown", rows[10][2])
    uri, sha256 = _snapshot(tmp_path, rows)
    merged = with_feedback(splits, _with(config, uri, sha256, holdout_fraction=0.2), None)
    assert merged.feedback is not None and len(merged.feedback) == 49
    assert set(merged.train["income"]) == {"<=50K", ">50K"}


def test_a_snapshot_that_changed_since_its_export_is_refused(adult, tmp_path):
    config, splits = adult
    uri, sha256 = _snapshot(tmp_path, _labelled(splits, 50))
    other = "0" * 64
    with pytest.raises(SnapshotDigestError, match=f"has sha256 {sha256}, not the {other}"):
        with_feedback(splits, _with(config, uri, other), None)
    frame, digest = read_snapshot(uri, sha256)
    assert digest == sha256 and len(frame) == 50
    # Without a digest to check (an operator's own file) it is read, and its digest recorded.
    assert with_feedback(splits, _with(config, uri, None), None).digests[uri] == sha256


def test_a_job_without_a_snapshot_trains_on_its_data_set_alone(adult):
    config, splits = adult
    assert with_feedback(splits, config.with_overrides({"feedback.enabled": True}), None) is splits


def test_snapshots_are_exported_as_the_training_job_reads_them():
    at = [START + timedelta(seconds=s) for s in (3, 1, 2)]
    rows: list[tuple[dict[str, Any], str, datetime]] = [
        ({"age": 40, "sex": "Male", "tags": ["a"]}, ">50K", at[0]),
        ({"age": None, "sex": "Female"}, "<=50K", at[1]),
        ({"age": 31.5, "sex": None, "tags": None}, "<=50K", at[2]),
    ]
    frame = snapshot_frame(rows, "income")
    assert list(frame.columns) == ["age", "sex", "tags", "income", TIME_COLUMN]
    assert frame[TIME_COLUMN].is_monotonic_increasing  # oldest first
    assert frame["age"].dtype == "float64" and frame["age"].isna().tolist() == [True, False, False]
    assert frame["tags"].tolist() == [None, None, '["a"]']
    assert frame["income"].tolist() == ["<=50K", "<=50K", ">50K"]
    back = pd.read_parquet(io.BytesIO(parquet_bytes(frame)))
    assert back["income"].tolist() == frame["income"].tolist()


def test_a_snapshot_goes_to_the_object_store_when_there_is_one(tmp_path):
    job = uuid.uuid4()
    local = Settings(state_dir=tmp_path, s3={"bucket": None})
    assert snapshot_uri(local, "adult-income", job) == str(tmp_path.resolve() / f"feedback/adult-income/{job}.parquet")
    s3 = Settings(state_dir=tmp_path, s3={"bucket": "lake"}, joblimits={"dataset_prefix": "sets"})
    assert snapshot_uri(s3, "adult-income", job) == f"s3://lake/sets/feedback/adult-income/{job}.parquet"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"data.feedback_sha256": "a" * 64}, "without data.feedback_uri"),
        ({"data.feedback_uri": "x.parquet", "data.feedback_sha256": "not-a-digest"}, "String should match"),
        ({"feedback.min_rows": 10, "feedback.max_rows": 5}, "above feedback.max_rows"),
        ({"feedback.holdout_fraction": 1.0}, "less than 1"),
        ({"promotion.recent_rule": "recent_or_test"}, "recent_and_test"),
        ({"promotion.test_tolerance": -0.1}, "greater than or equal to 0"),
    ],
)
def test_feedback_settings_are_checked_when_the_config_loads(overrides, message):
    with pytest.raises(ValidationError, match=message):
        load_config("jobs/configs/adult.yaml").with_overrides(overrides)


def test_feedback_is_off_by_default_and_the_gate_weighs_both_splits():
    config = load_config("jobs/configs/adult.yaml")
    assert not config.feedback.enabled and config.data.feedback_uri is None
    assert config.feedback.holdout_fraction == 0.3 and config.feedback.min_rows == 50
    assert config.promotion.recent_rule == "recent_and_test" and config.promotion.test_tolerance == 0.02
