"""Drift of live traffic against a model version's reference profile, and its estimated accuracy.

Pure functions: the live monitor reads the window (request rows and recorded outputs) and the
version's `jobs.profile.ReferenceProfile`, and `judge` compares them. No I/O here.

Which test for which feature, after Evidently's defaults:

- numeric, small samples: the two-sample Kolmogorov-Smirnov test of the window against the
  profile's sample; drifted when p < `p_value`. It needs no binning and is exact enough at a few
  hundred rows, where a distance would be mostly noise.
- categorical, small samples: the chi-square goodness-of-fit test of the window's counts against
  the reference frequencies scaled to the window; drifted when p < `p_value`. Categories expected
  fewer than 5 times are pooled into one bucket (the chi-square approximation needs expected counts
  of 5 or more), together with the categories the reference never saw, which get a tiny reference
  share (`EPSILON`) so that a new category shows as a large deviation instead of being dropped.
- numeric, larger samples: the Wasserstein distance between the profile's sample and the window,
  divided by the reference standard deviation (Evidently's normed distance: in units of the
  feature's spread, so one threshold fits every feature); drifted when >= `wasserstein`. A
  reference that is constant has no spread; its norm is floored at `MIN_NORM`, as in Evidently, so
  the window drifts once it moves off that constant by a ten-thousandth or more.
- categorical, larger samples: the Jensen-Shannon distance (base 2, so in [0, 1]) between the two
  frequency vectors over the union of categories; drifted when >= `jensen_shannon`.

Evidently picks the test from the reference's size alone (p-value tests up to 1,000 reference
rows). Here it is picked from the smaller of the two samples, min(window rows, reference rows),
because the live window is the small side: the reference is the whole training split, thousands of
rows, so Evidently's rule would always pick the distances, and a distance computed on a window of a
few hundred rows is mostly sampling noise, where a p-value test accounts for the sample size. Once
both sides have thousands of rows the distances take over: a p-value test on 5,000 rows flags
differences too small to matter (real traffic always differs a little from the training split, and
at that size any difference is "significant"), while a distance with a fixed threshold measures how
large the difference is. Evidently's z-test for two-category features is not used: chi-square
covers them.

Alongside, the population stability index (PSI) of every feature: over the profile's own quantile
bins for a numeric feature (the bins its counts were taken with), over the categories for a
categorical one. It is reported, not judged: a common rule of thumb reads < 0.1 as stable and
> 0.2 as a large shift.

Missing values (None, and for a numeric feature anything that is not a finite number) are left out
of every statistic. A feature with no values in the window, or none in the reference, is reported
(`window_rows` says how many values it had) but not judged: drifted is False, its score neutral
(p-value 1, distance 0), and it counts in neither side of the drift share, since nothing was
compared.

The prediction is judged like a feature: the probability of classes[1] for a binary classifier
(numeric), the predicted label for other classifiers (categorical), the predicted value for a
regressor (numeric). Rows recorded before outputs were stored (output None) are skipped.

Estimated performance without labels (NannyML's confidence-based estimation, CBPE): if the model's
probabilities are calibrated, the top-class probability is the chance that the prediction is right,
so its mean over the window is the expected accuracy; for a binary classifier, p = P(classes[1])
counts as p expected positives and 1 - p expected negatives, which gives expected true and false
positive counts at every threshold and so an expected ROC curve. Nothing is estimated for a
regressor.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.spatial.distance import jensenshannon
from scipy.stats import chisquare, ks_2samp, wasserstein_distance

from jobs.profile import CategoricalProfile, NumericProfile, ReferenceProfile

# Share given to an empty bin (PSI) or to the categories the reference never saw (chi-square):
# small enough not to move a populated bin, large enough that logarithms and divisions stay finite.
EPSILON = 1e-4
# Least norm of the Wasserstein distance (Evidently's): a constant reference has no spread.
MIN_NORM = 1e-3
# Least expected count of a chi-square bucket; rarer categories are pooled.
MIN_EXPECTED = 5.0

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class DriftThresholds:
    """Built from MonitorSettings by the monitor."""

    small_sample_rows: int = 1000  # min(window, reference) <= this: KS / chi-square, drifted when p < p_value
    p_value: float = 0.05
    wasserstein: float = 0.1  # normed Wasserstein distance (Evidently's default) for larger samples
    jensen_shannon: float = 0.1  # Jensen-Shannon distance for larger categorical samples
    drift_share: float = 0.5  # dataset drift when >= this share of the judged features drifted


@dataclass(frozen=True)
class FeatureDrift:
    name: str  # the feature; for the prediction: "positive", "labels" or "value" (the PredictionProfile field)
    kind: str  # "numeric" | "categorical"
    test: str  # "ks" | "chi2" | "wasserstein" | "jensen_shannon"
    score: float  # p-value for ks/chi2, distance otherwise
    threshold: float
    drifted: bool
    psi: float
    window_rows: int  # non-missing values in the window


@dataclass(frozen=True)
class DriftReport:
    features: list[FeatureDrift]
    prediction: FeatureDrift | None
    drift_share: float  # drifted features / judged features (those with values on both sides)
    dataset_drift: bool
    estimated_accuracy: float | None
    estimated_roc_auc: float | None  # binary classification only
    reference_accuracy: float | None
    window_rows: int


def judge(
    profile: ReferenceProfile,
    features: list[dict[str, Any]],
    outputs: list[dict[str, Any] | None],
    thresholds: DriftThresholds,
) -> DriftReport:
    """Compares a window of live rows (request features, and the model's outputs in the same order)
    with the reference profile of the version that answered them."""
    if len(features) != len(outputs):
        raise ValueError(f"{len(features)} feature rows but {len(outputs)} outputs: they must pair up")
    drifts = [
        judge_feature(name, reference, [row.get(name) for row in features], thresholds)
        for name, reference in profile.features.items()
    ]
    judged = [
        drift
        for drift, reference in zip(drifts, profile.features.values(), strict=True)
        if drift.window_rows > 0 and has_reference(reference)
    ]
    share = sum(d.drifted for d in judged) / len(judged) if judged else 0.0
    recorded = [output for output in outputs if output is not None]
    # Parsed once: both the prediction drift and the estimates read the probabilities.
    probabilities = [class_probabilities(o) for o in recorded] if profile.task == "classification" else []
    accuracy, roc_auc = estimate_performance(profile, probabilities)
    return DriftReport(
        features=drifts,
        prediction=judge_prediction(profile, recorded, probabilities, thresholds),
        drift_share=share,
        dataset_drift=bool(judged) and share >= thresholds.drift_share,
        estimated_accuracy=accuracy,
        estimated_roc_auc=roc_auc,
        reference_accuracy=profile.reference_accuracy,
        window_rows=len(features),
    )


def has_reference(reference: NumericProfile | CategoricalProfile) -> bool:
    """Whether the training split had values of the feature to compare with."""
    if isinstance(reference, NumericProfile):
        return len(reference.sample) > 0
    return sum(reference.frequencies.values()) > 0


def judge_feature(
    name: str, reference: NumericProfile | CategoricalProfile, values: Iterable[Any], thresholds: DriftThresholds
) -> FeatureDrift:
    """One feature's window values (raw, missing ones included) against its reference profile."""
    if isinstance(reference, NumericProfile):
        return judge_numeric(name, reference, numeric_values(values), thresholds)
    return judge_categorical(name, reference, category_values(values), thresholds)


def as_float(value: Any) -> float | None:
    """A numeric feature's value, or None when missing: None, text that is no number, NaN, infinities."""
    # JSON's float and int first: they match without the (slower) abstract check NumPy's scalars need.
    if isinstance(value, float | int | numbers.Real):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def numeric_values(values: Iterable[Any]) -> FloatArray:
    return np.array([n for n in (as_float(v) for v in values) if n is not None], dtype=np.float64)


def category_values(values: Iterable[Any]) -> list[str]:
    """Categories as strings (the profile's keys); None is missing."""
    return [str(v) for v in values if v is not None]


def judge_numeric(
    name: str, reference: NumericProfile, window: FloatArray, thresholds: DriftThresholds
) -> FeatureDrift:
    sample = np.asarray(reference.sample, dtype=np.float64)
    small = min(window.size, reference.rows) <= thresholds.small_sample_rows
    test, threshold = ("ks", thresholds.p_value) if small else ("wasserstein", thresholds.wasserstein)
    if window.size == 0 or not has_reference(reference):
        return _unjudged(name, "numeric", test, threshold, window.size)
    score = ks_p_value(sample, window) if small else normed_wasserstein(sample, window, reference.std)
    drifted = score < threshold if small else score >= threshold
    return FeatureDrift(name, "numeric", test, score, threshold, drifted, numeric_psi(reference, window), window.size)


def judge_categorical(
    name: str, reference: CategoricalProfile, window: Sequence[str], thresholds: DriftThresholds
) -> FeatureDrift:
    counts = Counter(window)
    rows = len(window)
    small = min(rows, reference.rows) <= thresholds.small_sample_rows
    test, threshold = ("chi2", thresholds.p_value) if small else ("jensen_shannon", thresholds.jensen_shannon)
    if rows == 0 or not has_reference(reference):
        return _unjudged(name, "categorical", test, threshold, rows)
    if small:
        score = chi_square_p_value(reference.frequencies, counts)
    else:
        score = jensen_shannon_distance(reference.frequencies, counts)
    drifted = score < threshold if small else score >= threshold
    psi = categorical_psi(reference.frequencies, counts)
    return FeatureDrift(name, "categorical", test, score, threshold, drifted, psi, rows)


def _unjudged(name: str, kind: str, test: str, threshold: float, rows: int) -> FeatureDrift:
    neutral = 1.0 if test in ("ks", "chi2") else 0.0
    return FeatureDrift(name, kind, test, neutral, threshold, False, 0.0, rows)


def ks_p_value(reference: FloatArray, window: FloatArray) -> float:
    return float(ks_2samp(reference, window).pvalue)


def normed_wasserstein(reference: FloatArray, window: FloatArray, reference_std: float) -> float:
    """Wasserstein distance in units of the reference's standard deviation (Evidently's norm)."""
    return float(wasserstein_distance(reference, window) / max(reference_std, MIN_NORM))


def chi_square_p_value(reference: Mapping[str, int], window: Mapping[str, int]) -> float:
    """Goodness of fit of the window's category counts to the reference shares.

    Buckets: the reference's categories, plus one for those it never saw (share EPSILON). Buckets
    expected fewer than MIN_EXPECTED times are pooled into one, which is kept even when it stays
    below that: a pooled bucket that fills up is precisely what a new category looks like."""
    categories = list(reference)
    shares = np.array([reference[c] for c in categories], dtype=np.float64)
    shares = np.append(shares / shares.sum() * (1 - EPSILON), EPSILON)
    observed = np.array([window.get(c, 0) for c in categories], dtype=np.float64)
    unseen = sum(count for category, count in window.items() if category not in reference)
    observed = np.append(observed, unseen)
    expected = shares * observed.sum()
    rare = expected < MIN_EXPECTED
    if rare.any():
        observed = np.append(observed[~rare], observed[rare].sum())
        expected = np.append(expected[~rare], expected[rare].sum())
    if observed.size < 2:
        return 1.0  # one bucket: nothing to compare
    return float(chisquare(observed, expected).pvalue)


def jensen_shannon_distance(reference: Mapping[str, int], window: Mapping[str, int]) -> float:
    """Jensen-Shannon distance (base 2: 0 identical, 1 disjoint) over the union of categories."""
    reference_counts, window_counts = _aligned(reference, window)
    distance = float(jensenshannon(reference_counts, window_counts, base=2))
    # Nearly identical vectors can round to the square root of a tiny negative number.
    return distance if math.isfinite(distance) else 0.0


def _aligned(reference: Mapping[str, int], window: Mapping[str, int]) -> tuple[FloatArray, FloatArray]:
    categories = list(reference) + [c for c in window if c not in reference]
    return (
        np.array([reference.get(c, 0) for c in categories], dtype=np.float64),
        np.array([window.get(c, 0) for c in categories], dtype=np.float64),
    )


def psi(expected_counts: FloatArray, actual_counts: FloatArray) -> float:
    """Population stability index of the actual (window) counts against the expected (reference)
    counts over the same bins: sum((a - e) * ln(a / e)) of the shares, EPSILON for empty bins."""
    expected = np.maximum(expected_counts / expected_counts.sum(), EPSILON)
    actual = np.maximum(actual_counts / actual_counts.sum(), EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def numeric_psi(reference: NumericProfile, window: FloatArray) -> float:
    """PSI over the profile's quantile bins: bin i holds edges[i-1] <= x < edges[i], as profiled."""
    bins = np.searchsorted(np.asarray(reference.edges, dtype=np.float64), window, side="right")
    actual = np.bincount(bins, minlength=len(reference.edges) + 1).astype(np.float64)
    expected = np.asarray(reference.counts, dtype=np.float64)
    if expected.sum() == 0 or actual.sum() == 0:
        return 0.0
    return psi(expected, actual)


def categorical_psi(reference: Mapping[str, int], window: Mapping[str, int]) -> float:
    return psi(*_aligned(reference, window))


def judge_prediction(
    profile: ReferenceProfile,
    outputs: Sequence[Mapping[str, Any]],
    probabilities: Sequence[Mapping[str, float]],
    thresholds: DriftThresholds,
) -> FeatureDrift | None:
    """Drift of the model's outputs (recorded ones only; for a classifier, `probabilities` holds them
    parsed by class_probabilities); None when the profile has nothing to compare them with."""
    prediction = profile.prediction
    classes = profile.classes or []
    if profile.task == "regression":
        if prediction.value is None:
            return None
        return judge_numeric("value", prediction.value, numeric_values(o.get("value") for o in outputs), thresholds)
    if prediction.positive is not None and len(classes) == 2:
        positive = numeric_values(p.get(classes[1]) for p in probabilities)
        return judge_numeric("positive", prediction.positive, positive, thresholds)
    if prediction.labels is not None:
        labels = [label for label in (predicted_label(p) for p in probabilities) if label is not None]
        return judge_categorical("labels", prediction.labels, labels, thresholds)
    return None


def class_probabilities(output: Mapping[str, Any]) -> dict[str, float]:
    """The class probabilities of a recorded classification output; empty when malformed."""
    probabilities = output.get("probabilities")
    if not isinstance(probabilities, dict):
        return {}
    numbers = {str(label): as_float(p) for label, p in probabilities.items()}
    return {label: p for label, p in numbers.items() if p is not None}


def predicted_label(probabilities: Mapping[str, float]) -> str | None:
    """The class of the highest probability (the label the model answered)."""
    return max(probabilities, key=lambda label: probabilities[label]) if probabilities else None


def estimate_performance(
    profile: ReferenceProfile, probabilities: Sequence[Mapping[str, float]]
) -> tuple[float | None, float | None]:
    """(estimated accuracy, estimated ROC AUC) from the calibrated class probabilities of the
    recorded outputs; None where undefined, and always for a regressor."""
    if profile.task != "classification":
        return None, None
    parsed = [p for p in probabilities if p]
    accuracy = estimated_accuracy(np.array([max(p.values()) for p in parsed], dtype=np.float64))
    classes = profile.classes or []
    if len(classes) != 2:
        return accuracy, None
    positive = np.array([p[classes[1]] for p in parsed if classes[1] in p], dtype=np.float64)
    return accuracy, estimated_roc_auc(positive)


def estimated_accuracy(top_probabilities: FloatArray) -> float | None:
    """Mean top-class probability: the expected share of right predictions if calibrated."""
    return float(top_probabilities.mean()) if top_probabilities.size else None


def estimated_roc_auc(positive: FloatArray) -> float | None:
    """Expected ROC AUC from P(positive) alone, if calibrated: each row counts p expected positives
    and 1 - p expected negatives. Thresholds run down the distinct probabilities; rows that share a
    probability enter together (one point per tie, as sklearn's roc_curve does)."""
    if positive.size == 0:
        return None
    scores = np.clip(positive, 0.0, 1.0)
    scores = scores[np.argsort(-scores, kind="stable")]
    true_positives = np.cumsum(scores)
    false_positives = np.cumsum(1.0 - scores)
    if true_positives[-1] <= 0 or false_positives[-1] <= 0:
        return None  # all expected one class: no ROC curve
    last_of_tie = np.append(np.flatnonzero(np.diff(scores)), scores.size - 1)
    tpr = np.append(0.0, true_positives[last_of_tie] / true_positives[-1])
    fpr = np.append(0.0, false_positives[last_of_tie] / false_positives[-1])
    return float(np.trapezoid(tpr, fpr))
