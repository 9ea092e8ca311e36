import numpy as np
import pandas as pd
import pytest

from jobs.config import DataConfig, FeatureDecl, JobConfig, load_config
from jobs.data.loading import clean_frame, load_splits
from jobs.preprocess import Preprocessor
from jobs.schema import build_schema, snake_case


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("education-num", "education_num"), ("HoursPerWeek", "hours_per_week"), (" native country ", "native_country")],
)
def test_snake_case_names(raw, expected):
    assert snake_case(raw) == expected


def test_adult_splits_are_cleaned():
    config = load_config("jobs/configs/adult.yaml")
    splits = load_splits(config)
    assert len(splits.train) + len(splits.val) == 32561
    assert len(splits.test) == 16281  # the "|1x3 Cross validator" line is skipped
    assert set(splits.test["income"]) == {"<=50K", ">50K"}  # trailing dots stripped
    assert "education_num" in splits.train.columns
    assert splits.train["workclass"].isna().any()  # "?" is missing, not a category
    assert "?" not in set(splits.train["occupation"].dropna())
    assert all(len(d) == 64 for d in splits.digests.values())


def test_schema_declares_and_infers():
    config = load_config("jobs/configs/adult.yaml")
    splits = load_splits(config)
    schema = build_schema(splits.train, config)
    kinds = {f.name: f.kind for f in schema.features}
    assert kinds["age"] == "numeric" and kinds["workclass"] == "categorical"
    assert "income" not in kinds
    assert schema.classes == ["<=50K", ">50K"]
    workclass = next(f for f in schema.features if f.name == "workclass")
    assert workclass.nullable and "Private" in workclass.categories


def _config(**data):
    return JobConfig(name="t", data=DataConfig(train_uri="x.csv", target="y", **data))


def test_declared_feature_must_exist():
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": ["p", "q"]})
    with pytest.raises(ValueError, match="declared features not in the data: zzz"):
        build_schema(frame, _config(features={"zzz": FeatureDecl(kind="numeric")}))


def test_numeric_codes_can_be_declared_categorical():
    frame = pd.DataFrame({"code": [1, 2, 1, 3], "y": ["p", "q", "p", "q"]})
    schema = build_schema(frame, _config(features={"code": FeatureDecl(kind="categorical")}))
    assert schema.features[0].kind == "categorical"
    assert schema.features[0].categories == ["1", "2", "3"]


def test_target_with_one_class_is_rejected():
    frame = pd.DataFrame({"a": [1.0, 2.0], "y": ["p", "p"]})
    with pytest.raises(ValueError, match="fewer than two classes"):
        build_schema(frame, _config())


def test_clean_frame_strips_and_marks_missing():
    raw = pd.DataFrame({"Col A": [" x ", "?", "y"], "Target": ["a.", "b.", " a."]})
    cleaned = clean_frame(raw, DataConfig(train_uri="x", target="Target", target_rstrip=".", na_values=["?"]))
    assert list(cleaned.columns) == ["col_a", "target"]
    assert cleaned["col_a"].tolist()[0] == "x" and pd.isna(cleaned["col_a"].tolist()[1])
    assert cleaned["target"].tolist() == ["a", "b", "a"]


def _fitted(frame: pd.DataFrame, **features) -> Preprocessor:
    config = _config(features={k: FeatureDecl(**v) for k, v in features.items()})
    return Preprocessor.fit(frame, build_schema(frame, config))


def test_encoding_maps_unknown_and_missing_to_reserved_index():
    frame = pd.DataFrame({"c": ["a", "b", None, "a"], "n": [1.0, 2.0, 3.0, 4.0], "y": ["p", "q", "p", "q"]})
    pre = _fitted(frame)
    enc = pre.encode(pd.DataFrame({"c": ["a", "zzz", None], "n": [1.0, np.nan, 4.0]}))
    assert enc.x_cat[:, 0].tolist() == [1, 0, 0]
    assert enc.x_num[1, 0] == 0.0  # missing numerics become the training mean
    assert pre.cardinalities == [3]


def test_numeric_standardisation_and_log1p():
    frame = pd.DataFrame({"n": [0.0, 9.0, 99.0, 999.0], "y": ["p", "q", "p", "q"]})
    pre = _fitted(frame, n={"kind": "numeric", "transform": "log1p"})
    enc = pre.encode(frame)
    assert abs(float(enc.x_num[:, 0].mean())) < 1e-6
    assert abs(float(enc.x_num[:, 0].std()) - 1.0) < 1e-5


def test_buckets_add_an_embedding_column():
    frame = pd.DataFrame({"n": np.arange(100, dtype=float), "y": ["p", "q"] * 50})
    pre = _fitted(frame, n={"kind": "numeric", "buckets": 4})
    enc = pre.encode(pd.DataFrame({"n": [0.0, 99.0, np.nan]}))
    assert enc.x_cat.shape == (3, 1)
    assert enc.x_cat[0, 0] < enc.x_cat[1, 0] and enc.x_cat[2, 0] == 0
    assert pre.cardinalities == [len(pre.state.bucket_edges["n"]) + 2]


def test_preprocessor_json_round_trip_encodes_identically():
    config = load_config("jobs/configs/adult.yaml")
    splits = load_splits(config)
    pre = Preprocessor.fit(splits.train, build_schema(splits.train, config))
    again = Preprocessor.from_json(pre.to_json())
    a, b = pre.encode(splits.test.head(200)), again.encode(splits.test.head(200))
    assert np.array_equal(a.x_cat, b.x_cat) and np.allclose(a.x_num, b.x_num)


def test_regression_target_round_trip():
    frame = pd.DataFrame({"n": [1.0, 2.0, 3.0, 4.0], "y": [10.0, 20.0, 30.0, 40.0]})
    config = JobConfig(name="r", task="regression", data=DataConfig(train_uri="x", target="y"))
    pre = Preprocessor.fit(frame, build_schema(frame, config))
    encoded = pre.encode_target(frame)
    assert abs(float(encoded.mean())) < 1e-6
    assert np.allclose(pre.decode_regression(encoded.astype(float)), frame["y"].to_numpy())
