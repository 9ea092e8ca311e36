"""Fitted, vectorised preprocessing: categorical vocabularies and numeric standardisation.

The same object is used in training and serving and is saved next to the model weights as JSON,
so a served model never depends on the training code's pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel

from jobs.schema import DataSchema


class NumericStats(BaseModel):
    mean: float
    std: float


class PreprocessorState(BaseModel):
    schema_: DataSchema
    numeric_stats: dict[str, NumericStats]
    bucket_edges: dict[str, list[float]] = {}
    target_mean: float = 0.0  # regression targets are standardised for training
    target_std: float = 1.0

    model_config = {"populate_by_name": True}


@dataclass
class Encoded:
    x_cat: np.ndarray  # int64 (rows, categorical features); 0 = missing or unseen
    x_num: np.ndarray  # float32 (rows, numeric features)


class Preprocessor:
    def __init__(self, state: PreprocessorState) -> None:
        self.state = state
        self.schema = state.schema_
        self._cat_index = {f.name: pd.Index(f.categories) for f in self.schema.categorical}
        self._class_index = pd.Index(self.schema.classes or [])
        # Plain dicts for encode_records: a look-up per value beats building pandas objects
        # for the few rows of an online request.
        self._cat_codes: dict[str, dict[str | None, int]] = {
            f.name: {c: i + 1 for i, c in enumerate(f.categories)} for f in self.schema.categorical
        }
        self._bucket_edges = {f.name: np.asarray(self.state.bucket_edges[f.name]) for f in self.schema.bucketed}

    # Construction ------------------------------------------------------------------------

    @classmethod
    def fit(cls, frame: pd.DataFrame, schema: DataSchema) -> Preprocessor:
        stats: dict[str, NumericStats] = {}
        for f in schema.numeric:
            values = _transform(pd.to_numeric(frame[f.name], errors="coerce").to_numpy(np.float64), f.transform)
            mean = float(np.nanmean(values)) if np.isfinite(values).any() else 0.0
            std = float(np.nanstd(values)) if np.isfinite(values).any() else 1.0
            stats[f.name] = NumericStats(mean=mean, std=std if std > 1e-12 else 1.0)
        edges: dict[str, list[float]] = {}
        for f in schema.bucketed:
            values = pd.to_numeric(frame[f.name], errors="coerce").dropna().to_numpy(np.float64)
            quantiles = np.quantile(values, np.linspace(0, 1, f.buckets + 1)[1:-1]) if len(values) else []
            edges[f.name] = [float(q) for q in np.unique(quantiles)]
        target_mean, target_std = 0.0, 1.0
        if schema.task == "regression":
            y = pd.to_numeric(frame[schema.target], errors="coerce").to_numpy(np.float64)
            target_mean = float(np.nanmean(y))
            target_std = float(np.nanstd(y)) or 1.0
        return cls(
            PreprocessorState(
                schema_=schema,
                numeric_stats=stats,
                bucket_edges=edges,
                target_mean=target_mean,
                target_std=target_std,
            )
        )

    def to_json(self) -> str:
        return self.state.model_dump_json(by_alias=True, indent=2)

    @classmethod
    def from_json(cls, text: str) -> Preprocessor:
        return cls(PreprocessorState.model_validate_json(text))

    # Shapes -------------------------------------------------------------------------------

    @property
    def cardinalities(self) -> list[int]:
        """Vocabulary sizes including the reserved index 0: categoricals, then numeric buckets."""
        vocab = [len(f.categories) + 1 for f in self.schema.categorical]
        return vocab + [len(self.state.bucket_edges[f.name]) + 2 for f in self.schema.bucketed]

    @property
    def n_numeric(self) -> int:
        return len(self.schema.numeric)

    @property
    def n_outputs(self) -> int:
        return len(self.schema.classes or []) if self.schema.task == "classification" else 1

    # Transforms ---------------------------------------------------------------------------

    def encode(self, frame: pd.DataFrame) -> Encoded:
        rows = len(frame)
        n_cat = len(self.schema.categorical)
        x_cat = np.zeros((rows, n_cat + len(self.schema.bucketed)), dtype=np.int64)
        for j, f in enumerate(self.schema.categorical):
            column = frame[f.name]
            codes = self._cat_index[f.name].get_indexer(column.astype(str))
            codes[column.isna().to_numpy()] = -1
            x_cat[:, j] = codes + 1  # -1 (missing/unseen) becomes the reserved 0
        for j, f in enumerate(self.schema.bucketed):
            raw = pd.to_numeric(frame[f.name], errors="coerce").to_numpy(np.float64)
            bucket = np.searchsorted(np.asarray(self.state.bucket_edges[f.name]), raw, side="right") + 1
            x_cat[:, n_cat + j] = np.where(np.isnan(raw), 0, bucket)
        x_num = np.zeros((rows, self.n_numeric), dtype=np.float32)
        for j, f in enumerate(self.schema.numeric):
            st = self.state.numeric_stats[f.name]
            raw = pd.to_numeric(frame[f.name], errors="coerce").to_numpy(np.float64)
            values = (_transform(raw, f.transform) - st.mean) / st.std
            x_num[:, j] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        return Encoded(x_cat=x_cat, x_num=x_num)

    def encode_records(self, rows: list[dict[str, Any]]) -> Encoded:
        """encode() for JSON rows, without a DataFrame: the serving path. Same codes and values
        as encode() for the same rows (tested); numbers may be int or float, None is missing."""
        n_cat = len(self.schema.categorical)
        x_cat = np.zeros((len(rows), n_cat + len(self.schema.bucketed)), dtype=np.int64)
        for j, f in enumerate(self.schema.categorical):
            codes = self._cat_codes[f.name]
            # Unseen and missing values share the reserved code 0, as in encode().
            x_cat[:, j] = [codes.get(_category(row.get(f.name)), 0) for row in rows]
        for j, f in enumerate(self.schema.bucketed):
            raw = _numbers(rows, f.name)
            bucket = np.searchsorted(self._bucket_edges[f.name], raw, side="right") + 1
            x_cat[:, n_cat + j] = np.where(np.isnan(raw), 0, bucket)
        x_num = np.zeros((len(rows), self.n_numeric), dtype=np.float32)
        for j, f in enumerate(self.schema.numeric):
            st = self.state.numeric_stats[f.name]
            values = (_transform(_numbers(rows, f.name), f.transform) - st.mean) / st.std
            x_num[:, j] = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
        return Encoded(x_cat=x_cat, x_num=x_num)

    def encode_target(self, frame: pd.DataFrame) -> np.ndarray:
        target = frame[self.schema.target]
        if self.schema.task == "classification":
            codes = self._class_index.get_indexer(target.astype(str))
            if (codes < 0).any():
                unknown = sorted(set(target.astype(str)[codes < 0]))[:5]
                raise ValueError(f"labels not seen in training: {unknown}")
            return codes.astype(np.int64)
        y = pd.to_numeric(target, errors="coerce").to_numpy(np.float64)
        return ((y - self.state.target_mean) / self.state.target_std).astype(np.float32)

    def decode_regression(self, y: np.ndarray) -> np.ndarray:
        return y * self.state.target_std + self.state.target_mean

    def to_columns(self, frame: pd.DataFrame, with_target: bool = True) -> pd.DataFrame:
        """Flat numeric columns for Ray Data: c0..cN (codes), n0..nM (numerics), y."""
        enc = self.encode(frame)
        columns: dict[str, np.ndarray] = {}
        for j in range(enc.x_cat.shape[1]):
            columns[f"c{j}"] = enc.x_cat[:, j]
        for j in range(enc.x_num.shape[1]):
            columns[f"n{j}"] = enc.x_num[:, j]
        if with_target:
            columns["y"] = self.encode_target(frame)
        return pd.DataFrame(columns)


def _category(value: Any) -> str | None:
    # encode() compares str(value); None stays missing.
    return None if value is None else value if isinstance(value, str) else str(value)


def _numbers(rows: list[dict[str, Any]], name: str) -> np.ndarray:
    values = [row.get(name) for row in rows]
    try:
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    except (TypeError, ValueError):
        # Non-numeric strings: pd.to_numeric's coercion, as encode() does.
        return pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").to_numpy(np.float64)


def _transform(values: np.ndarray, transform: str) -> np.ndarray:
    if transform == "log1p":
        return np.log1p(np.clip(values, 0, None))
    return values
