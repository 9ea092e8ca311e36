"""What judging one window costs the live monitor: `services.monitoring.drift.judge` timed per
window size, against a reference profile of the Adult data set's shape.

    .venv/bin/python -m benchmarks.drift_window [--rows 300 --rows 1000 --rows 5000] [--repeats 7] [--out FILE]

The profile and the windows are synthetic (no training, no stack): the six numeric and eight
categorical features of jobs/configs/adult.yaml, drawn with shapes like Adult's (integer ages and
hours, a heavy-tailed fnlwgt, capital gains and losses mostly zero, categories with skewed shares,
up to 41 native countries), a reference of the training split's size and binary outputs. Windows
are drawn from the same distributions, so the tests run to the end as on steady traffic. Small
windows take KS / chi-square, larger ones Wasserstein / Jensen-Shannon (see the module docstring of
services/monitoring/drift.py); each size is timed `repeats` times after one untimed call. Prints
one line per size to stderr and writes JSON to --out, or to stdout without it.
"""

from __future__ import annotations

import json
import statistics
import time
from collections import Counter
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from benchmarks.report import machine_info
from jobs.profile import (
    PROFILE_SAMPLE_ROWS,
    PSI_BINS,
    CategoricalProfile,
    NumericProfile,
    PredictionProfile,
    ReferenceProfile,
)
from services.monitoring.drift import DriftThresholds, judge

# Adult's training split: 32,561 rows less the validation fraction (jobs/configs/adult.yaml).
REFERENCE_ROWS = 29305
CLASSES = ["<=50K", ">50K"]
# Categorical features and how many categories each has in Adult.
CATEGORIES = {
    "workclass": 8,
    "education": 16,
    "marital_status": 7,
    "occupation": 14,
    "relationship": 6,
    "race": 5,
    "sex": 2,
    "native_country": 41,
}


def _mostly_zero(rng: np.random.Generator, rows: int, nonzero: float, scale: float) -> np.ndarray:
    values = np.round(rng.lognormal(np.log(scale), 1.0, rows))
    return np.where(rng.random(rows) < nonzero, values, 0.0)


def draw_rows(rng: np.random.Generator, rows: int) -> dict[str, list[Any]]:
    """Columns shaped like Adult's features, as JSON values."""
    columns: dict[str, list[Any]] = {
        "age": np.clip(np.round(rng.normal(38.6, 13.6, rows)), 17, 90).tolist(),
        "fnlwgt": np.round(rng.lognormal(np.log(178000), 0.5, rows)).tolist(),
        "education_num": rng.integers(1, 17, rows).tolist(),
        "capital_gain": _mostly_zero(rng, rows, 0.08, 3000).tolist(),
        "capital_loss": _mostly_zero(rng, rows, 0.05, 1800).tolist(),
        "hours_per_week": np.clip(np.round(rng.normal(40.4, 12.3, rows)), 1, 99).tolist(),
    }
    for name, count in CATEGORIES.items():
        shares = 1.0 / np.arange(1, count + 1) ** 1.5  # a few common categories and a long tail
        columns[name] = rng.choice([f"{name}-{i}" for i in range(count)], rows, p=shares / shares.sum()).tolist()
    return columns


def draw_positive(rng: np.random.Generator, rows: int) -> np.ndarray:
    """P(>50K): most rows confidently low, as on Adult (about a quarter positive)."""
    return rng.beta(0.5, 1.4, rows)


def numeric_profile(values: list[Any], rng: np.random.Generator) -> NumericProfile:
    """The binning of jobs.profile: interior quantile edges, counts with searchsorted(side="right")."""
    array = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(array, np.linspace(0, 1, PSI_BINS + 1)[1:-1]))
    counts = np.bincount(np.searchsorted(edges, array, side="right"), minlength=edges.size + 1)
    sample = rng.choice(array, size=min(array.size, PROFILE_SAMPLE_ROWS), replace=False)
    return NumericProfile(
        rows=array.size,
        missing=0,
        edges=edges.tolist(),
        counts=counts.tolist(),
        sample=sample.tolist(),
        mean=float(array.mean()),
        std=float(array.std()),
    )


def reference_profile(rng: np.random.Generator) -> ReferenceProfile:
    columns = draw_rows(rng, REFERENCE_ROWS)
    features: dict[str, NumericProfile | CategoricalProfile] = {}
    for name, values in columns.items():
        if name in CATEGORIES:
            features[name] = CategoricalProfile(rows=len(values), missing=0, frequencies=dict(Counter(values)))
        else:
            features[name] = numeric_profile(values, rng)
    positive = draw_positive(rng, REFERENCE_ROWS)
    labels = np.where(positive >= 0.5, CLASSES[1], CLASSES[0]).tolist()
    prediction = PredictionProfile(
        labels=CategoricalProfile(rows=REFERENCE_ROWS, missing=0, frequencies=dict(Counter(labels))),
        positive=numeric_profile(positive.tolist(), rng),
        confidence=numeric_profile(np.maximum(positive, 1 - positive).tolist(), rng),
    )
    return ReferenceProfile(
        task="classification",
        target="income",
        classes=CLASSES,
        rows=REFERENCE_ROWS,
        features=features,
        prediction=prediction,
        reference_accuracy=0.85,
        reference_roc_auc=0.9,
    )


def window(rng: np.random.Generator, rows: int) -> tuple[list[dict[str, Any]], list[dict[str, Any] | None]]:
    columns = draw_rows(rng, rows)
    names = list(columns)
    features = [dict(zip(names, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    outputs: list[dict[str, Any] | None] = [
        {"probabilities": {CLASSES[0]: 1 - p, CLASSES[1]: p}} for p in draw_positive(rng, rows).tolist()
    ]
    return features, outputs


def measure(rows: int, repeats: int, profile: ReferenceProfile, thresholds: DriftThresholds) -> dict[str, Any]:
    features, outputs = window(np.random.default_rng(rows), rows)
    report = judge(profile, features, outputs, thresholds)  # untimed: first calls warm SciPy's code paths
    times_ms = []
    for _ in range(repeats):
        started = time.perf_counter()
        judge(profile, features, outputs, thresholds)
        times_ms.append((time.perf_counter() - started) * 1000)
    return {
        "rows": rows,
        "tests": sorted({f.test for f in report.features}),
        "drift_share": report.drift_share,
        "repeats": repeats,
        "median_ms": statistics.median(times_ms),
        "min_ms": min(times_ms),
        "max_ms": max(times_ms),
        "stdev_ms": statistics.stdev(times_ms) if repeats > 1 else 0.0,
        "times_ms": times_ms,
    }


def main(
    rows: Annotated[list[int] | None, typer.Option(help="window size (repeat the option for several)")] = None,
    repeats: Annotated[int, typer.Option(min=1, help="timed calls per window size")] = 7,
    out: Annotated[Path | None, typer.Option(help="write the JSON here instead of stdout")] = None,
) -> None:
    thresholds = DriftThresholds()
    profile = reference_profile(np.random.default_rng(0))
    results = []
    for size in rows or [300, 1000, 5000]:
        figures = measure(size, repeats, profile, thresholds)
        results.append(figures)
        typer.echo(
            f"{size:>6} rows ({'/'.join(figures['tests'])}): median {figures['median_ms']:.1f} ms, "
            f"min {figures['min_ms']:.1f}, max {figures['max_ms']:.1f}, stdev {figures['stdev_ms']:.1f}",
            err=True,
        )
    summary = {
        "machine": {**machine_info(), "numpy": version("numpy"), "scipy": version("scipy")},
        "reference_rows": REFERENCE_ROWS,
        "features": {"numeric": len(profile.features) - len(CATEGORIES), "categorical": len(CATEGORIES)},
        "thresholds": asdict(thresholds),
        "windows": results,
    }
    text = json.dumps(summary, indent=2)
    if out is None:
        typer.echo(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    typer.run(main)
