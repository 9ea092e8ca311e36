"""The reference profile of a model version: what its training data and its predictions looked like.

Computed at training time from the training split (features, calibrated predictions) and the
validation split (calibration, reference accuracy), saved next to the weights, and read by the live
monitor, which compares recent traffic with it (services/monitoring). The format is versioned: a
monitor refuses a profile of a format it does not know rather than misread it.

A registered version carries this module (jobs/pyfunc.py INFERENCE_MODULES: the predictor loads the
profile saved with it), so it imports nothing but pydantic, numpy, pandas and the schema. The
training-only assembly of a profile (it needs the evaluation code) is jobs/finish.py.

Binning of a numeric feature, which the drift code must reproduce exactly: `edges` are
`np.unique(np.quantile(values, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))` over the profiled
non-missing values (the interior quantiles, duplicates dropped, so a feature with few distinct
values has fewer bins), and a value v falls in bin `np.searchsorted(edges, v, side="right")`: bin 0
holds v < edges[0], bin i holds edges[i-1] <= v < edges[i], the last bin v >= edges[-1].
`bin_counts` does both halves for a live window.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from jobs.schema import DataSchema

PROFILE_FILE = "reference_profile.json"
# Quantile bins of a numeric feature (for the population stability index).
PSI_BINS = 10
# Raw values kept per numeric feature for the two-sample tests against a live window.
PROFILE_SAMPLE_ROWS = 5000
# Equal-width confidence bins of the reliability curve.
RELIABILITY_BINS = 10


class NumericProfile(BaseModel):
    kind: Literal["numeric"] = "numeric"
    rows: int  # non-missing values profiled
    missing: int
    edges: list[float]  # interior quantile edges, ascending and distinct
    counts: list[int]  # len(edges) + 1 counts of the profiled values in those bins
    sample: list[float]  # at most PROFILE_SAMPLE_ROWS values, drawn without replacement
    mean: float
    std: float


class CategoricalProfile(BaseModel):
    kind: Literal["categorical"] = "categorical"
    rows: int
    missing: int
    frequencies: dict[str, int]  # category (as a string) -> count


FeatureProfile = Annotated[NumericProfile | CategoricalProfile, Field(discriminator="kind")]


class ReliabilityBin(BaseModel):
    lower: float
    upper: float
    count: int
    confidence: float  # mean top-class probability of the bin's rows
    accuracy: float  # share of them predicted right


class CalibrationProfile(BaseModel):
    method: Literal["temperature"] = "temperature"
    temperature: float
    ece_before: float
    ece_after: float
    reliability: list[ReliabilityBin]  # calibrated, validation split
    reliability_before: list[ReliabilityBin]


class PredictionProfile(BaseModel):
    labels: CategoricalProfile | None = None  # predicted labels (classification)
    positive: NumericProfile | None = None  # probability of classes[1] (binary classification)
    confidence: NumericProfile | None = None  # top-class probability (classification)
    value: NumericProfile | None = None  # predicted value (regression)


class ReferenceProfile(BaseModel):
    format: Literal[1] = 1
    task: Literal["classification", "regression"]
    target: str
    classes: list[str] | None = None
    rows: int  # training split rows profiled
    features: dict[str, FeatureProfile]  # every input feature, raw values (before transforms)
    prediction: PredictionProfile  # calibrated outputs on the training split
    calibration: CalibrationProfile | None = None
    reference_accuracy: float | None = None  # calibrated model on the validation split
    reference_roc_auc: float | None = None  # binary classification only


def load_profile(predictor_dir: Path) -> ReferenceProfile | None:
    """The profile saved with a predictor; None for versions trained before profiles existed."""
    path = predictor_dir / PROFILE_FILE
    if not path.is_file():
        return None
    return ReferenceProfile.model_validate_json(path.read_text(encoding="utf-8"))


# Builders -------------------------------------------------------------------------------------


def quantile_edges(values: np.ndarray) -> np.ndarray:
    """The interior PSI_BINS-quantile edges of finite `values`, ascending and distinct."""
    if len(values) == 0:
        return np.empty(0, dtype=np.float64)
    return np.unique(np.quantile(values, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))


def bin_counts(edges: np.ndarray | list[float], values: np.ndarray) -> np.ndarray:
    """How many of the finite `values` fall in each of the len(edges) + 1 bins of a NumericProfile."""
    edges = np.asarray(edges, dtype=np.float64)
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def numeric_values(column: pd.Series) -> np.ndarray:
    """A raw column as float64, with anything that is not a finite number as NaN (missing)."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(np.float64)
    return np.where(np.isfinite(values), values, np.nan)


def numeric_profile(values: np.ndarray) -> NumericProfile:
    """The profile of float values; NaN counts as missing. An all-missing feature gets no edges,
    one empty bin and a zero mean and deviation (JSON has no NaN)."""
    present = values[~np.isnan(values)]
    edges = quantile_edges(present)
    if len(present) > PROFILE_SAMPLE_ROWS:
        sample = np.random.default_rng(0).choice(present, PROFILE_SAMPLE_ROWS, replace=False)
    else:
        sample = present
    return NumericProfile(
        rows=len(present),
        missing=len(values) - len(present),
        edges=edges.tolist(),
        counts=bin_counts(edges, present).tolist(),
        sample=sample.tolist(),
        mean=float(present.mean()) if len(present) else 0.0,
        std=float(present.std()) if len(present) else 0.0,
    )


def categorical_profile(column: pd.Series, categories: list[str] | None = None) -> CategoricalProfile:
    """Counts per category, keyed by str(value) as the preprocessor encodes them; `categories`
    (the ones known at training) are listed even when absent from `column`, with a zero count."""
    present = column.dropna().astype(str)
    frequencies = dict.fromkeys(categories or [], 0)
    for value, count in present.value_counts(sort=False).items():
        frequencies[str(value)] = int(count)
    return CategoricalProfile(rows=len(present), missing=len(column) - len(present), frequencies=frequencies)


def feature_profiles(schema: DataSchema, frame: pd.DataFrame) -> dict[str, FeatureProfile]:
    """Every input feature of `schema`, over the raw values of `frame` (before any transform or
    bucketing: what a caller sends). Bucketed numeric features are profiled as numbers."""
    profiles: dict[str, FeatureProfile] = {}
    for f in schema.features:
        if f.kind == "categorical":
            profiles[f.name] = categorical_profile(frame[f.name], f.categories)
        else:
            profiles[f.name] = numeric_profile(numeric_values(frame[f.name]))
    return profiles


def prediction_profile(schema: DataSchema, outputs: np.ndarray) -> PredictionProfile:
    """The profile of a model's outputs: class probabilities (rows, classes) or values (rows,)."""
    if schema.task == "regression":
        return PredictionProfile(value=numeric_profile(np.asarray(outputs, dtype=np.float64)))
    classes = list(schema.classes or [])
    probabilities = np.asarray(outputs, dtype=np.float64)
    labels = pd.Series(np.asarray(classes, dtype=object)[probabilities.argmax(axis=1)], dtype=object)
    return PredictionProfile(
        labels=categorical_profile(labels, classes),
        positive=numeric_profile(probabilities[:, 1]) if len(classes) == 2 else None,
        confidence=numeric_profile(probabilities.max(axis=1)),
    )
