"""Temperature scaling of a classifier's probabilities, and how well calibrated they are.

A network trained on log loss until validation early stopping is often over-confident: its top-class
probability runs ahead of how often it is right. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar T > 0, fitted on the validation split to minimise the negative log-likelihood:
the predicted class never changes (so accuracy and ROC AUC do not), the probabilities do. T > 1
softens over-confident outputs, T < 1 sharpens under-confident ones.

Calibration is measured by the expected calibration error: the rows are put in RELIABILITY_BINS
equal-width bins of top-class probability, and ECE is the row-weighted mean of |accuracy - mean
confidence| over the bins. The bins themselves are the reliability curve.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from jobs.profile import RELIABILITY_BINS, CalibrationProfile, ReliabilityBin

# The search range of T: wide enough for any network worth serving, narrow enough that the optimiser
# never reaches a T where every output is uniform or one-hot in float arithmetic.
MIN_TEMPERATURE = 0.05
MAX_TEMPERATURE = 20.0


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of `logits` (rows, classes) divided by `temperature`."""
    return np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1))


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean -log p(true class) under softmax(logits / temperature); `labels` are class indices."""
    if len(labels) == 0:
        return 0.0
    log_p = log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T in [MIN_TEMPERATURE, MAX_TEMPERATURE] minimising the NLL of `labels`; 1.0 when there
    is nothing to fit or the optimum found is no better than T = 1 (never worse than uncalibrated)."""
    if len(labels) == 0:
        return 1.0
    # Searched over log T: the loss is far better conditioned there, and T stays positive.
    found = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, labels, math.exp(log_t)),
        bounds=(math.log(MIN_TEMPERATURE), math.log(MAX_TEMPERATURE)),
        method="bounded",
    )
    temperature = math.exp(float(found.x))
    fitted = negative_log_likelihood(logits, labels, temperature)
    if not (math.isfinite(temperature) and math.isfinite(fitted)):
        return 1.0
    return temperature if fitted < negative_log_likelihood(logits, labels) else 1.0


def reliability_curve(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS
) -> list[ReliabilityBin]:
    """`bins` equal-width bins of top-class probability over [0, 1], every bin listed: a row with
    confidence c is in bin min(floor(c * bins), bins - 1). An empty bin has count 0 and confidence
    and accuracy 0.0 (readers skip it)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1) if len(probabilities) else np.empty(0)
    correct = probabilities.argmax(axis=1) == labels if len(probabilities) else np.empty(0, dtype=bool)
    index = np.minimum((confidence * bins).astype(np.int64), bins - 1)
    curve: list[ReliabilityBin] = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        curve.append(
            ReliabilityBin(
                lower=b / bins,
                upper=(b + 1) / bins,
                count=count,
                confidence=float(confidence[members].mean()) if count else 0.0,
                accuracy=float(correct[members].mean()) if count else 0.0,
            )
        )
    return curve


def expected_calibration_error(curve: list[ReliabilityBin]) -> float:
    """Row-weighted mean of |accuracy - confidence| over the bins of a reliability curve."""
    rows = sum(b.count for b in curve)
    if rows == 0:
        return 0.0
    return sum(b.count * abs(b.accuracy - b.confidence) for b in curve) / rows


def calibrate(logits: np.ndarray, labels: np.ndarray) -> CalibrationProfile:
    """Fit the temperature on (`logits`, `labels`) and describe calibration before and after it."""
    temperature = fit_temperature(logits, labels)
    before = reliability_curve(softmax(logits), labels)
    after = reliability_curve(softmax(logits, temperature), labels)
    return CalibrationProfile(
        temperature=temperature,
        ece_before=expected_calibration_error(before),
        ece_after=expected_calibration_error(after),
        reliability=after,
        reliability_before=before,
    )
