"""The last step of a training or tuning run before its model is registered: calibrate a classifier
on the validation split and build the reference profile the live monitor compares traffic with.

Both end up in the predictor (`temperature`, `profile`), so `TabularPredictor.save` writes them into
the directory that `log_and_register` uploads with the weights: a version has all of them or none.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from jobs.calibration import calibrate
from jobs.evaluate import evaluate
from jobs.predictor import TabularPredictor
from jobs.profile import CalibrationProfile, ReferenceProfile, feature_profiles, prediction_profile

# Training rows profiled at most (sampled with a fixed seed beyond): quantiles, frequencies and a
# prediction pass over more rows than this describe the same distribution, only slower.
PROFILE_MAX_ROWS = 200_000


def class_indices(predictor: TabularPredictor, frame: pd.DataFrame) -> np.ndarray:
    """The target of `frame` as indices into the predictor's classes; -1 for a label it never saw."""
    schema = predictor.schema
    return np.asarray(pd.Index(schema.classes or []).get_indexer(frame[schema.target].astype(str)))


def fit_calibration(predictor: TabularPredictor, val: pd.DataFrame) -> CalibrationProfile:
    """Temperature scaling of a classifier fitted on the validation split (rows whose label the
    model knows), with the reliability curves before and after."""
    labels = class_indices(predictor, val)
    known = labels >= 0
    return calibrate(predictor.logits(val[known]), labels[known])


def profiled_rows(frame: pd.DataFrame, max_rows: int = PROFILE_MAX_ROWS) -> pd.DataFrame:
    """`frame`, or a seeded sample of `max_rows` of its rows when it is larger."""
    return frame if len(frame) <= max_rows else frame.sample(n=max_rows, random_state=0)


def build_profile(
    predictor: TabularPredictor,
    train: pd.DataFrame,
    val: pd.DataFrame,
    calibration: CalibrationProfile | None,
) -> ReferenceProfile:
    """The reference profile of `predictor` as it will be served (set its temperature first): raw
    features and predictions over the training split (at most PROFILE_MAX_ROWS rows), accuracy and
    (binary) ROC AUC on the validation split."""
    schema = predictor.schema
    rows = profiled_rows(train)
    accuracy = roc_auc = None
    if schema.task == "classification" and (class_indices(predictor, val) >= 0).any():
        scores = evaluate(predictor, val)
        accuracy = scores.get("accuracy")
        roc_auc = scores.get("roc_auc") if len(schema.classes or []) == 2 else None
    return ReferenceProfile(
        task=schema.task,
        target=schema.target,
        classes=schema.classes,
        rows=len(rows),
        features=feature_profiles(schema, rows),
        prediction=prediction_profile(schema, predictor.raw_outputs(rows)),
        calibration=calibration,
        reference_accuracy=accuracy,
        reference_roc_auc=roc_auc,
    )


def calibrate_and_profile(predictor: TabularPredictor, train: pd.DataFrame, val: pd.DataFrame) -> dict[str, float]:
    """Set `predictor.temperature` (classifiers) and `predictor.profile`; returns the run metrics to
    log: `calibration_temperature`, `val_ece_before`, `val_ece_after` (none for regression)."""
    calibration = None
    if predictor.schema.task == "classification":
        calibration = fit_calibration(predictor, val)
        predictor.temperature = calibration.temperature
    predictor.profile = build_profile(predictor, train, val, calibration)
    if calibration is None:
        return {}
    return {
        "calibration_temperature": calibration.temperature,
        "val_ece_before": calibration.ece_before,
        "val_ece_after": calibration.ece_after,
    }
