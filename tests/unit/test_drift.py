"""Drift statistics of services/monitoring/drift.py on synthetic reference profiles and windows."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jobs.profile import (
    PROFILE_SAMPLE_ROWS,
    PSI_BINS,
    CategoricalProfile,
    NumericProfile,
    PredictionProfile,
    ReferenceProfile,
)
from services.monitoring.drift import DriftReport, DriftThresholds, FeatureDrift, estimated_roc_auc, judge

pytestmark = pytest.mark.unit

THRESHOLDS = DriftThresholds()
SMALL = 300  # window rows judged by KS / chi-square (<= small_sample_rows)
LARGE = 5000  # window rows judged by Wasserstein / Jensen-Shannon
REFERENCE_ROWS = 20000
CATEGORIES = ["a", "b", "c", "d"]
SHARES = [0.4, 0.3, 0.2, 0.1]


def numeric_profile(values: Sequence[float] | np.ndarray, seed: int = 0) -> NumericProfile:
    """The profile piece A's builder writes: quantile bins (interior edges), a sample, moments."""
    array = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(array, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, array, side="right"), minlength=edges.size + 1)
    sample = np.random.default_rng(seed).choice(array, size=min(array.size, PROFILE_SAMPLE_ROWS), replace=False)
    return NumericProfile(
        rows=array.size,
        missing=0,
        edges=edges.tolist(),
        counts=counts.tolist(),
        sample=sample.tolist(),
        mean=float(array.mean()),
        std=float(array.std()),
    )


def categorical_profile(values: Sequence[str]) -> CategoricalProfile:
    return CategoricalProfile(rows=len(values), missing=0, frequencies=dict(Counter(values)))


def draw(rng: np.random.Generator, rows: int, shift: float = 0.0, shares: Sequence[float] = SHARES) -> dict[str, Any]:
    """Columns of the synthetic data set, as JSON would give them: two numeric features (one shifted
    by `shift` stds) and two categorical ones (one drawn with `shares`)."""
    return {
        "age": rng.normal(40 + 12 * shift, 12, rows).tolist(),
        "hours": rng.gamma(4, 10, rows).tolist(),
        "color": rng.choice(CATEGORIES, rows, p=list(shares)).tolist(),
        "sex": rng.choice(["f", "m"], rows, p=[0.4, 0.6]).tolist(),
    }


def classifier_profile(prediction: PredictionProfile | None = None, rows: int = REFERENCE_ROWS) -> ReferenceProfile:
    columns = draw(np.random.default_rng(0), rows)
    return ReferenceProfile(
        task="classification",
        target="income",
        classes=["<=50K", ">50K"],
        rows=rows,
        features={
            "age": numeric_profile(columns["age"]),
            "hours": numeric_profile(columns["hours"]),
            "color": categorical_profile(columns["color"]),
            "sex": categorical_profile(columns["sex"]),
        },
        prediction=prediction or PredictionProfile(),
        reference_accuracy=0.85,
    )


def rows_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    names = list(columns)
    return [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def window(rows: int, seed: int = 1, **shift: Any) -> list[dict[str, Any]]:
    return rows_of(draw(np.random.default_rng(seed), rows, **shift))


def judged(profile: ReferenceProfile, features: list[dict[str, Any]], outputs: Any = None) -> DriftReport:
    return judge(profile, features, outputs if outputs is not None else [None] * len(features), THRESHOLDS)


def feature(report: DriftReport, name: str) -> FeatureDrift:
    return next(f for f in report.features if f.name == name)


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    return classifier_profile()


def test_an_unshifted_large_window_is_not_drifted(profile: ReferenceProfile) -> None:
    report = judged(profile, window(LARGE))
    assert {f.test for f in report.features} == {"wasserstein", "jensen_shannon"}
    assert not any(f.drifted for f in report.features)
    assert (report.drift_share, report.dataset_drift) == (0.0, False)
    assert report.window_rows == LARGE
    assert all(f.window_rows == LARGE for f in report.features)
    assert report.reference_accuracy == 0.85


def test_unshifted_small_windows_are_flagged_about_as_often_as_the_p_value_says(profile: ReferenceProfile) -> None:
    # A p-value test flags p_value of the features of unshifted windows by design; over 40 windows
    # the share stays near that, and two features of four rarely flag at once.
    reports = [judged(profile, window(SMALL, seed=seed)) for seed in range(1, 41)]
    assert all({f.test for f in r.features} == {"ks", "chi2"} for r in reports)
    flagged = [f.drifted for r in reports for f in r.features]
    assert sum(flagged) / len(flagged) <= 2 * THRESHOLDS.p_value
    assert sum(r.dataset_drift for r in reports) <= 2
    assert all(r.window_rows == SMALL for r in reports)


@pytest.mark.parametrize(("rows", "test"), [(SMALL, "ks"), (LARGE, "wasserstein")])
def test_a_numeric_feature_shifted_by_two_stds_drifts(profile: ReferenceProfile, rows: int, test: str) -> None:
    report = judged(profile, window(rows, shift=2.0))
    age = feature(report, "age")
    assert age.test == test
    assert age.drifted
    if test == "ks":
        assert age.score < 1e-6 and age.threshold == THRESHOLDS.p_value
    else:
        # A mean shift of two standard deviations is a normed Wasserstein distance of about 2.
        assert age.score == pytest.approx(2.0, abs=0.15)
    assert [f.name for f in report.features if f.drifted] == ["age"]
    assert report.drift_share == 0.25
    assert not report.dataset_drift


@pytest.mark.parametrize(("rows", "test"), [(SMALL, "chi2"), (LARGE, "jensen_shannon")])
def test_a_change_of_category_frequencies_drifts(profile: ReferenceProfile, rows: int, test: str) -> None:
    color = feature(judged(profile, window(rows, shares=[0.1, 0.2, 0.3, 0.4])), "color")
    assert color.test == test
    assert color.drifted
    assert feature(judged(profile, window(rows)), "color").test == test


@pytest.mark.parametrize("rows", [SMALL, LARGE])
def test_a_category_the_reference_never_saw_drives_drift(profile: ReferenceProfile, rows: int) -> None:
    rows_ = window(rows)
    for row in rows_[: rows // 10]:
        row["color"] = "never-seen"
    color = feature(judged(profile, rows_), "color")
    assert color.drifted
    assert color.psi > 0.2


def test_dataset_drift_when_the_share_of_drifted_features_reaches_the_threshold(profile: ReferenceProfile) -> None:
    report = judged(profile, window(SMALL, shift=2.0, shares=[0.1, 0.2, 0.3, 0.4]))
    assert report.drift_share == 0.5
    assert report.dataset_drift
    stricter = judge(profile, window(SMALL), [None] * SMALL, DriftThresholds(drift_share=0.0))
    assert stricter.dataset_drift  # 0 drifted >= 0 share


def test_psi_is_near_zero_unshifted_and_large_for_a_strong_shift(profile: ReferenceProfile) -> None:
    steady = judged(profile, window(LARGE))
    assert all(f.psi < 0.02 for f in steady.features)
    shifted = judged(profile, window(LARGE, shift=2.0, shares=[0.1, 0.2, 0.3, 0.4]))
    assert feature(shifted, "age").psi > 0.2
    assert feature(shifted, "color").psi > 0.2
    assert feature(shifted, "hours").psi < 0.02


def test_the_test_is_chosen_by_the_smaller_sample() -> None:
    # A small reference against a large window: the p-value tests, since the reference is the noisy side.
    report = judged(classifier_profile(rows=500), window(LARGE))
    assert {f.test for f in report.features} == {"ks", "chi2"}


def test_a_constant_reference_feature_drifts_only_when_the_window_moves_off_it() -> None:
    reference = classifier_profile()
    reference.features["version"] = numeric_profile(np.full(REFERENCE_ROWS, 3.0))
    for rows in (SMALL, LARGE):
        same = window(rows)
        for row in same:
            row["version"] = 3
        version = feature(judged(reference, same), "version")
        assert not version.drifted and version.psi == pytest.approx(0.0)
        moved = window(rows)
        for row in moved:
            row["version"] = 4
        assert feature(judged(reference, moved), "version").drifted


def test_missing_and_non_numeric_values_are_ignored(profile: ReferenceProfile) -> None:
    rows = window(SMALL)
    clean = [dict(row) for row in rows]
    noise: list[Any] = [None, "n/a", "", float("nan"), float("inf"), [1], {"x": 1}]
    for i, value in enumerate(noise * 10):
        rows[i]["age"], rows[i]["color"] = value, None
        del clean[i]["age"], clean[i]["color"]
    rows[-1]["hours"] = str(rows[-1]["hours"])  # a number sent as text still counts
    report = judged(profile, rows)
    assert [(f.name, f.window_rows) for f in report.features] == [
        ("age", SMALL - 70),
        ("hours", SMALL),
        ("color", SMALL - 70),
        ("sex", SMALL),
    ]
    # The same figures as the window without those values.
    assert report == judged(profile, clean)


def test_a_feature_without_values_in_the_window_is_reported_but_not_judged(profile: ReferenceProfile) -> None:
    rows = window(SMALL, shift=2.0)
    for row in rows:
        del row["sex"]
        row["hours"] = None
    report = judged(profile, rows)
    sex, hours = feature(report, "sex"), feature(report, "hours")
    assert (sex.window_rows, sex.drifted, sex.score, sex.psi) == (0, False, 1.0, 0.0)
    assert (hours.window_rows, hours.drifted) == (0, False)
    # age drifted, color did not: one of the two features judged.
    assert report.drift_share == 0.5
    assert report.dataset_drift
    empty = judged(profile, [])
    assert (empty.drift_share, empty.dataset_drift, empty.window_rows) == (0.0, False, 0)
    assert empty.estimated_accuracy is None and empty.estimated_roc_auc is None
    # The monitor stores reports as JSON (PostgreSQL's jsonb takes no NaN).
    for result in (report, empty):
        json.dumps(asdict(result), allow_nan=False)


def binary_outputs(positive: np.ndarray) -> list[dict[str, Any] | None]:
    return [{"probabilities": {"<=50K": 1 - p, ">50K": p}} for p in positive.tolist()]


def test_estimated_accuracy_and_roc_auc_match_the_realised_ones_when_calibrated() -> None:
    rng = np.random.default_rng(7)
    rows = 20000
    positive = rng.beta(0.6, 0.9, rows)
    labels = rng.random(rows) < positive  # drawn from the probabilities: calibrated by construction
    reference = numeric_profile(np.random.default_rng(8).beta(0.6, 0.9, REFERENCE_ROWS))
    profile = classifier_profile(PredictionProfile(positive=reference))
    report = judge(profile, [{}] * rows, binary_outputs(positive), THRESHOLDS)
    realised_accuracy = float(np.mean((positive >= 0.5) == labels))
    assert report.estimated_accuracy == pytest.approx(realised_accuracy, abs=0.02)
    assert report.estimated_roc_auc == pytest.approx(roc_auc_score(labels, positive), abs=0.02)
    assert report.prediction is not None
    assert (report.prediction.name, report.prediction.test) == ("positive", "wasserstein")
    assert not report.prediction.drifted
    assert report.prediction.window_rows == rows


def test_estimated_roc_auc_is_the_expected_roc_curve_with_ties() -> None:
    # Each row is p of a positive and 1 - p of a negative: sklearn's AUC of that weighted expansion
    # (which groups tied scores) is the exact expected-count curve.
    positive = np.random.default_rng(3).choice([0.05, 0.2, 0.5, 0.5, 0.8, 0.9], 1000)
    expected = roc_auc_score(
        np.r_[np.ones(positive.size), np.zeros(positive.size)],
        np.r_[positive, positive],
        sample_weight=np.r_[positive, 1 - positive],
    )
    assert estimated_roc_auc(positive) == pytest.approx(expected, abs=1e-12)
    assert estimated_roc_auc(np.full(10, 0.3)) == pytest.approx(0.5)
    assert estimated_roc_auc(np.zeros(10)) is None
    assert estimated_roc_auc(np.array([])) is None


def test_a_shift_of_the_predicted_probability_is_prediction_drift() -> None:
    profile = classifier_profile(
        PredictionProfile(positive=numeric_profile(np.random.default_rng(8).beta(2, 5, REFERENCE_ROWS)))
    )
    steady = judge(profile, [{}] * SMALL, binary_outputs(np.random.default_rng(1).beta(2, 5, SMALL)), THRESHOLDS)
    assert steady.prediction is not None and steady.prediction.test == "ks" and not steady.prediction.drifted
    moved = judge(profile, [{}] * SMALL, binary_outputs(np.random.default_rng(1).beta(5, 2, SMALL)), THRESHOLDS)
    assert moved.prediction is not None and moved.prediction.drifted


def test_multiclass_prediction_drift_is_on_the_predicted_label() -> None:
    classes = ["x", "y", "z"]
    rng = np.random.default_rng(0)
    reference_labels = rng.choice(classes, REFERENCE_ROWS, p=[0.5, 0.3, 0.2]).tolist()
    profile = classifier_profile(PredictionProfile(labels=categorical_profile(reference_labels)))
    profile = profile.model_copy(update={"classes": classes})

    def outputs(shares: list[float]) -> list[dict[str, Any] | None]:
        labels = rng.choice(classes, SMALL, p=shares)
        return [{"probabilities": {c: 0.6 if c == label else 0.2 for c in classes}} for label in labels]

    steady = judge(profile, [{}] * SMALL, outputs([0.5, 0.3, 0.2]), THRESHOLDS)
    assert steady.prediction is not None
    assert (steady.prediction.name, steady.prediction.test, steady.prediction.drifted) == ("labels", "chi2", False)
    assert steady.estimated_accuracy == pytest.approx(0.6)
    assert steady.estimated_roc_auc is None  # not binary
    moved = judge(profile, [{}] * SMALL, outputs([0.1, 0.2, 0.7]), THRESHOLDS)
    assert moved.prediction is not None and moved.prediction.drifted


def test_regression_estimates_nothing_and_judges_the_predicted_value() -> None:
    rng = np.random.default_rng(0)
    columns = draw(rng, REFERENCE_ROWS)
    profile = ReferenceProfile(
        task="regression",
        target="price",
        rows=REFERENCE_ROWS,
        features={"age": numeric_profile(columns["age"])},
        prediction=PredictionProfile(value=numeric_profile(rng.normal(100, 15, REFERENCE_ROWS))),
    )
    features = window(LARGE)
    steady = judge(profile, features, [{"value": v} for v in rng.normal(100, 15, LARGE)], THRESHOLDS)
    assert (steady.estimated_accuracy, steady.estimated_roc_auc, steady.reference_accuracy) == (None, None, None)
    assert steady.prediction is not None
    assert (steady.prediction.name, steady.prediction.test, steady.prediction.drifted) == (
        "value",
        "wasserstein",
        False,
    )
    moved = judge(profile, features, [{"value": v} for v in rng.normal(130, 15, LARGE)], THRESHOLDS)
    assert moved.prediction is not None and moved.prediction.drifted
    assert moved.prediction.score == pytest.approx(2.0, abs=0.15)


def test_rows_recorded_without_an_output_are_skipped() -> None:
    rng = np.random.default_rng(5)
    profile = classifier_profile(
        PredictionProfile(positive=numeric_profile(np.random.default_rng(8).beta(2, 5, REFERENCE_ROWS)))
    )
    positive = rng.beta(2, 5, SMALL)
    outputs = binary_outputs(positive)
    for i in range(0, SMALL, 3):
        outputs[i] = None
    kept = np.array([p for i, p in enumerate(positive) if i % 3])
    report = judge(profile, window(SMALL), outputs, THRESHOLDS)
    assert report.window_rows == SMALL
    assert report.prediction is not None and report.prediction.window_rows == kept.size
    assert report.estimated_accuracy == pytest.approx(float(np.maximum(kept, 1 - kept).mean()))
    assert report.estimated_roc_auc == pytest.approx(estimated_roc_auc(kept))


def test_features_and_outputs_must_pair_up(profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="pair up"):
        judge(profile, window(3), [None, None], THRESHOLDS)


def test_a_profile_from_the_training_builders_judges_live_rows() -> None:
    import pandas as pd

    from jobs.profile import categorical_profile as build_categorical
    from jobs.profile import numeric_profile as build_numeric
    from jobs.profile import numeric_values as training_values

    columns = draw(np.random.default_rng(0), REFERENCE_ROWS)
    columns["age"][:100] = [None] * 50 + ["?"] * 50  # missing in training too
    profile = classifier_profile().model_copy(
        update={
            "features": {
                "age": build_numeric(training_values(pd.Series(columns["age"], dtype=object))),
                "hours": build_numeric(training_values(pd.Series(columns["hours"]))),
                # A category known at training but never seen in its split: listed with a zero count.
                "color": build_categorical(pd.Series(columns["color"]), [*CATEGORIES, "e"]),
                "sex": build_categorical(pd.Series(columns["sex"])),
            }
        }
    )
    steady = judged(profile, window(LARGE))
    assert not any(f.drifted for f in steady.features)
    assert all(f.psi < 0.02 for f in steady.features)
    shifted = judged(profile, window(LARGE, shift=2.0, shares=[0.1, 0.2, 0.3, 0.4]))
    assert [f.name for f in shifted.features if f.drifted] == ["age", "color"]
    small = judged(profile, window(SMALL, shift=2.0))
    assert [f.name for f in small.features if f.drifted] == ["age"]
