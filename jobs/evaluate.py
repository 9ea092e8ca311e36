"""Held-out metrics, computed the same way for a new model and for the champion."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm

from jobs.predictor import TabularPredictor

# Metrics where a larger value is better; everything else is minimised.
HIGHER_IS_BETTER = {"accuracy", "roc_auc", "f1", "r2"}


def classification_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    n_classes = proba.shape[1]
    predicted = proba.argmax(axis=1)
    clipped = np.clip(proba, 1e-7, 1 - 1e-7)
    result = {
        "accuracy": float(skm.accuracy_score(y_true, predicted)),
        "log_loss": float(skm.log_loss(y_true, clipped, labels=list(range(n_classes)))),
    }
    present = np.unique(y_true)
    if n_classes == 2:
        result["f1"] = float(skm.f1_score(y_true, predicted, pos_label=1, zero_division=0))
        if len(present) == 2:
            result["roc_auc"] = float(skm.roc_auc_score(y_true, proba[:, 1]))
    else:
        result["f1"] = float(skm.f1_score(y_true, predicted, average="macro", zero_division=0))
        if len(present) == n_classes:
            result["roc_auc"] = float(skm.roc_auc_score(y_true, proba, multi_class="ovr"))
    return result


def regression_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return {
        "rmse": float(np.sqrt(skm.mean_squared_error(y_true, y_pred))),
        "mae": float(skm.mean_absolute_error(y_true, y_pred)),
        "r2": float(skm.r2_score(y_true, y_pred)),
    }


def evaluate(predictor: TabularPredictor, frame: pd.DataFrame) -> dict[str, float]:
    schema = predictor.schema
    outputs = predictor.raw_outputs(frame)
    if schema.task == "classification":
        y = pd.Index(schema.classes or []).get_indexer(frame[schema.target].astype(str))
        known = y >= 0  # a label the model never saw cannot be scored by it
        return classification_metrics(y[known], outputs[known])
    y_true = pd.to_numeric(frame[schema.target], errors="coerce").to_numpy(np.float64)
    return regression_metrics(y_true, outputs)


def is_higher_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER
