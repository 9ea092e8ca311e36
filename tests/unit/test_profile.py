"""The reference profile and calibration saved with a predictor: what the monitor and serving read."""

import json

import numpy as np
import pandas as pd
import pytest

from jobs.config import DataConfig, FeatureDecl, JobConfig
from jobs.evaluate import evaluate
from jobs.finish import build_profile, calibrate_and_profile, profiled_rows
from jobs.predictor import CALIBRATION_FILE, TabularPredictor
from jobs.profile import (
    PROFILE_FILE,
    PROFILE_SAMPLE_ROWS,
    PSI_BINS,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    bin_counts,
    load_profile,
)
from tests.predictors import untrained_predictor


def _frame(rows: int, seed: int = 0, task: str = "classification") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 80, rows).astype(np.float64)
    age[rng.random(rows) < 0.05] = np.nan
    sex = rng.choice(np.array(["Female", "Male", None], dtype=object), rows, p=[0.45, 0.45, 0.1])
    frame = pd.DataFrame(
        {"age": age, "sex": sex, "hours": rng.exponential(40.0, rows), "code": rng.integers(1, 4, rows)}
    )
    if task == "classification":
        frame["income"] = np.where(np.nan_to_num(age) > 45, ">50K", "<=50K")
    else:
        frame["income"] = np.nan_to_num(age) * 1000.0 + rng.normal(0, 100, rows)
    return frame


def _config(task: str = "classification") -> JobConfig:
    features = {"hours": FeatureDecl(kind="numeric", buckets=4), "code": FeatureDecl(kind="categorical")}
    return JobConfig(name="t", task=task, data=DataConfig(train_uri="memory", target="income", features=features))


@pytest.fixture
def classifier() -> tuple[TabularPredictor, pd.DataFrame, pd.DataFrame]:
    train, val = _frame(600), _frame(300, seed=1)
    return untrained_predictor(train, _config()), train, val


def test_numeric_profiles_bin_raw_values_by_quantiles(classifier):
    predictor, train, val = classifier
    profile = build_profile(predictor, train, val, None)
    for name in ("age", "hours"):  # plain and bucketed numeric features alike, before any transform
        feature = profile.features[name]
        assert isinstance(feature, NumericProfile)
        raw = train[name].dropna().to_numpy()
        assert feature.rows == len(raw) and feature.missing == train[name].isna().sum()
        expected_edges = np.unique(np.quantile(raw, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
        assert feature.edges == pytest.approx(expected_edges.tolist())
        assert len(feature.counts) == len(feature.edges) + 1 <= PSI_BINS
        assert sum(feature.counts) == feature.rows
        assert feature.counts == bin_counts(feature.edges, raw).tolist()
        by_hand = [
            int(((raw >= lo) & (raw < hi)).sum())
            for lo, hi in zip([-np.inf, *feature.edges], [*feature.edges, np.inf], strict=True)
        ]
        assert feature.counts == by_hand  # bin i holds edges[i-1] <= v < edges[i]
        assert feature.mean == pytest.approx(raw.mean()) and feature.std == pytest.approx(raw.std())
        assert sorted(feature.sample) == sorted(raw.tolist())  # fewer rows than the sample cap: all of them


def test_categorical_profiles_count_categories_as_strings(classifier):
    predictor, train, val = classifier
    profile = build_profile(predictor, train, val, None)
    sex = profile.features["sex"]
    assert isinstance(sex, CategoricalProfile)
    assert sex.frequencies == train["sex"].value_counts().to_dict()
    assert sex.missing == train["sex"].isna().sum() and sex.rows + sex.missing == len(train)
    code = profile.features["code"]  # integer codes declared categorical: keyed as the encoder reads them
    assert isinstance(code, CategoricalProfile)
    assert code.frequencies == {str(k): v for k, v in train["code"].value_counts().items()}
    assert set(profile.features) == set(predictor.schema.feature_names)


def test_the_sample_is_capped_and_drawn_from_the_data():
    train = _frame(PROFILE_SAMPLE_ROWS + 1500)
    predictor = untrained_predictor(train, _config())
    feature = build_profile(predictor, train, train.head(50), None).features["hours"]
    assert isinstance(feature, NumericProfile)
    assert len(feature.sample) == PROFILE_SAMPLE_ROWS
    assert len(set(feature.sample)) == PROFILE_SAMPLE_ROWS  # without replacement (the values are distinct)
    assert set(feature.sample) <= set(train["hours"].tolist())
    again = build_profile(predictor, train, train.head(50), None).features["hours"]
    assert isinstance(again, NumericProfile) and again.sample == feature.sample  # seeded


def test_large_training_splits_are_profiled_on_a_seeded_sample():
    frame = _frame(1000)
    sample = profiled_rows(frame, max_rows=100)
    assert len(sample) == 100 and sample.index.isin(frame.index).all()
    assert sample.index.equals(profiled_rows(frame, max_rows=100).index)
    assert profiled_rows(frame, max_rows=5000) is frame


def test_calibration_and_profile_round_trip_through_save_and_load(classifier, tmp_path):
    predictor, train, val = classifier
    metrics = calibrate_and_profile(predictor, train, val)
    assert set(metrics) == {"calibration_temperature", "val_ece_before", "val_ece_after"}
    assert metrics["calibration_temperature"] == predictor.temperature
    profile = predictor.profile
    assert profile is not None and profile.calibration is not None
    assert profile.calibration.temperature == predictor.temperature
    assert profile.calibration.ece_after == metrics["val_ece_after"]
    assert profile.rows == len(train) and profile.classes == ["<=50K", ">50K"]
    assert profile.reference_accuracy == pytest.approx(evaluate(predictor, val)["accuracy"])
    assert profile.reference_roc_auc == pytest.approx(evaluate(predictor, val)["roc_auc"])
    prediction = profile.prediction
    assert prediction.labels is not None and set(prediction.labels.frequencies) == {"<=50K", ">50K"}
    assert sum(prediction.labels.frequencies.values()) == len(train)
    assert prediction.positive is not None and prediction.confidence is not None and prediction.value is None
    assert min(prediction.confidence.sample) >= 0.5

    directory = predictor.save(tmp_path / "p")
    assert json.loads((directory / CALIBRATION_FILE).read_text()) == {
        "method": "temperature",
        "temperature": predictor.temperature,
    }
    assert load_profile(directory) == profile
    loaded = TabularPredictor.load(directory)
    assert loaded.temperature == predictor.temperature
    assert loaded.profile == profile
    assert np.array_equal(loaded.raw_outputs(val), predictor.raw_outputs(val))


def test_versions_saved_before_calibration_load_uncalibrated(classifier, tmp_path):
    predictor, _, val = classifier
    before = predictor.raw_outputs(val)
    predictor.temperature = 2.0
    directory = predictor.save(tmp_path / "p")
    (directory / CALIBRATION_FILE).unlink()
    assert not (directory / PROFILE_FILE).exists()
    loaded = TabularPredictor.load(directory)
    assert loaded.temperature == 1.0 and loaded.profile is None
    assert load_profile(directory) is None
    assert np.allclose(loaded.raw_outputs(val), before)


def test_saving_without_a_profile_drops_a_stale_one(classifier, tmp_path):
    predictor, train, val = classifier
    calibrate_and_profile(predictor, train, val)
    directory = predictor.save(tmp_path / "p")
    predictor.profile = None
    predictor.save(directory)
    assert TabularPredictor.load(directory).profile is None


def test_calibrated_outputs_sum_to_one_and_keep_the_predicted_class(classifier):
    predictor, _, val = classifier
    logits = predictor.logits(val)
    uncalibrated = predictor.raw_outputs(val)
    predictor.temperature = 0.25  # sharper than the untrained network, so outputs move visibly
    calibrated = predictor.raw_outputs(val)
    assert np.allclose(calibrated.sum(axis=1), 1.0, atol=1e-5)
    assert np.array_equal(calibrated.argmax(axis=1), uncalibrated.argmax(axis=1))
    assert not np.allclose(calibrated, uncalibrated)
    expected = np.exp(logits / 0.25) / np.exp(logits / 0.25).sum(axis=1, keepdims=True)
    assert np.allclose(calibrated, expected, atol=1e-5)
    rows = val[predictor.schema.feature_names].to_dict("records")
    assert np.allclose(predictor.record_outputs(rows), calibrated, atol=1e-6)  # the serving path too


def test_temperature_must_be_positive(classifier):
    predictor, _, _ = classifier
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            predictor.temperature = bad


def test_an_unknown_calibration_method_is_refused(classifier, tmp_path):
    predictor, _, _ = classifier
    directory = predictor.save(tmp_path / "p")
    (directory / CALIBRATION_FILE).write_text('{"method": "isotonic", "temperature": 1.0}')
    with pytest.raises(ValueError, match="method"):
        TabularPredictor.load(directory)


def test_regression_gets_a_profile_and_no_calibration(tmp_path):
    train, val = _frame(400, task="regression"), _frame(100, seed=1, task="regression")
    predictor = untrained_predictor(train, _config("regression"))
    assert calibrate_and_profile(predictor, train, val) == {}
    profile = predictor.profile
    assert profile is not None and profile.task == "regression"
    assert profile.calibration is None and profile.reference_accuracy is None and profile.classes is None
    assert profile.prediction.value is not None and profile.prediction.labels is None
    assert profile.prediction.value.rows == len(train)
    with pytest.raises(ValueError, match="classifier"):
        predictor.logits(val)
    directory = predictor.save(tmp_path / "p")
    assert not (directory / CALIBRATION_FILE).exists()
    assert TabularPredictor.load(directory).profile == profile


def test_the_profile_format_is_checked():
    with pytest.raises(ValueError):
        ReferenceProfile.model_validate(
            {"format": 2, "task": "regression", "target": "y", "rows": 0, "features": {}, "prediction": {}}
        )
