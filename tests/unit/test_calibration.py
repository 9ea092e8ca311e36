"""Temperature scaling and calibration error on synthetic logits whose true probabilities are known."""

import numpy as np
import pytest

from jobs.calibration import (
    calibrate,
    expected_calibration_error,
    fit_temperature,
    negative_log_likelihood,
    reliability_curve,
    softmax,
)
from jobs.profile import RELIABILITY_BINS

ROWS = 20_000


def _calibrated_sample(classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): probabilities that are right by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 1.5, (ROWS, classes))
    probabilities = softmax(logits)
    labels = (rng.random(ROWS)[:, None] > probabilities.cumsum(axis=1)).sum(axis=1)
    return logits, labels


def test_an_over_confident_model_is_softened_and_better_calibrated():
    logits, labels = _calibrated_sample()
    over_confident = logits * 3.0  # what the model reports: sharper than the truth
    profile = calibrate(over_confident, labels)
    assert profile.temperature > 1.5
    assert profile.temperature == pytest.approx(3.0, rel=0.15)
    assert profile.ece_after < profile.ece_before
    assert negative_log_likelihood(over_confident, labels, profile.temperature) < negative_log_likelihood(
        over_confident, labels
    )


def test_an_under_confident_model_is_sharpened():
    logits, labels = _calibrated_sample(seed=1)
    assert fit_temperature(logits / 2.0, labels) < 0.75


def test_a_calibrated_model_keeps_a_temperature_near_one():
    logits, labels = _calibrated_sample(seed=2)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.1)


def test_the_fitted_temperature_is_never_worse_than_none():
    logits, labels = _calibrated_sample(seed=3)
    for scale in (0.3, 1.0, 4.0):
        t = fit_temperature(logits * scale, labels)
        assert negative_log_likelihood(logits * scale, labels, t) <= negative_log_likelihood(logits * scale, labels)
    assert fit_temperature(np.empty((0, 3)), np.empty(0, dtype=np.int64)) == 1.0


def test_temperature_keeps_the_predicted_class_and_sums_to_one():
    logits, _ = _calibrated_sample(seed=4)
    for t in (0.5, 1.0, 2.5):
        p = softmax(logits, t)
        assert np.allclose(p.sum(axis=1), 1.0)
        assert np.array_equal(p.argmax(axis=1), logits.argmax(axis=1))


def test_reliability_bins_cover_every_row_once():
    logits, labels = _calibrated_sample(seed=5)
    curve = reliability_curve(softmax(logits), labels)
    assert len(curve) == RELIABILITY_BINS
    assert sum(b.count for b in curve) == ROWS
    assert [b.lower for b in curve] == pytest.approx([i / RELIABILITY_BINS for i in range(RELIABILITY_BINS)])
    assert curve[-1].upper == 1.0
    for b in curve:
        if b.count:
            assert b.lower <= b.confidence <= b.upper
            assert 0.0 <= b.accuracy <= 1.0
        else:
            assert b.confidence == b.accuracy == 0.0


def test_certain_predictions_land_in_the_last_bin():
    probabilities = np.array([[1.0, 0.0], [0.0, 1.0]])
    curve = reliability_curve(probabilities, np.array([0, 0]))
    assert curve[-1].count == 2 and curve[-1].accuracy == 0.5
    assert expected_calibration_error(curve) == pytest.approx(0.5)


def test_a_perfectly_calibrated_sample_has_a_small_error():
    logits, labels = _calibrated_sample(seed=6)
    assert expected_calibration_error(reliability_curve(softmax(logits), labels)) < 0.02
    over = expected_calibration_error(reliability_curve(softmax(logits * 3.0), labels))
    assert over > 0.05


def test_no_rows_have_no_error():
    curve = reliability_curve(np.empty((0, 2)), np.empty(0, dtype=np.int64))
    assert sum(b.count for b in curve) == 0
    assert expected_calibration_error(curve) == 0.0
