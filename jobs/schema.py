"""One data schema, derived from a data set and its job config, shared by training, request
validation and the UI."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
from pydantic import BaseModel

if TYPE_CHECKING:  # a registered model carries this module, not the job config's
    from jobs.config import JobConfig

TaskType = Literal["classification", "regression"]
FeatureKind = Literal["numeric", "categorical"]
Transform = Literal["none", "log1p"]

_NON_WORD = re.compile(r"[^0-9a-zA-Z]+")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def snake_case(name: str) -> str:
    """`education-num` -> `education_num`, `HoursPerWeek` -> `hours_per_week`."""
    spaced = _CAMEL.sub("_", name.strip())
    return _NON_WORD.sub("_", spaced).strip("_").lower()


class FeatureSpec(BaseModel):
    name: str
    kind: FeatureKind
    transform: Transform = "none"
    buckets: int = 0
    categories: list[str] = []
    nullable: bool = False


class DataSchema(BaseModel):
    task: TaskType
    target: str
    features: list[FeatureSpec]
    classes: list[str] | None = None  # classification labels, in model output order

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]

    @property
    def numeric(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "numeric"]

    @property
    def categorical(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "categorical"]

    @property
    def bucketed(self) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == "numeric" and f.buckets > 0]


class FeatureRules:
    """The per-value rules of a model's schema, precomputed: the one rule that request validation
    (serve_apps/validation.py) and batch scoring (jobs/validation.py) apply to each feature value of
    a row, so that both refuse a value for the same reason, in the same words."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self._categories = {f.name: frozenset(f.categories) for f in schema.categorical}
        self._numeric = {f.name for f in schema.numeric}
        self._nullable = {f.name for f in schema.features if f.nullable}

    def check_value(self, name: str, value: Any) -> tuple[str, str] | None:
        """(error type, message) for a value of feature `name` the model refuses, or None."""
        if value is None:
            return None if name in self._nullable else ("null_forbidden", "may not be null")
        if name in self._numeric:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                return ("type_error", "must be a number")
            try:
                finite = math.isfinite(value)
            except OverflowError:
                finite = False
            if not finite:
                return ("value_error", "must be a finite number (within ±1.8e308)")
            return None
        if not isinstance(value, str):
            return ("type_error", "must be a string")
        if value not in self._categories[name]:
            allowed = sorted(self._categories[name])
            shown = ", ".join(allowed[:8]) + (", ..." if len(allowed) > 8 else "")
            return ("unknown_category", f"unknown category {value[:64]!r}; expected one of: {shown}")
        return None


def infer_kind(series: pd.Series) -> FeatureKind:
    if pd.api.types.is_bool_dtype(series):
        return "categorical"
    return "numeric" if pd.api.types.is_numeric_dtype(series) else "categorical"


def build_schema(frame: pd.DataFrame, config: JobConfig) -> DataSchema:
    """Declared features win; the rest are inferred from dtypes unless inference is off."""
    target = snake_case(config.data.target)
    declared = {snake_case(k): v for k, v in config.data.features.items()}
    dropped = {snake_case(c) for c in config.data.drop}
    names = [c for c in frame.columns if c != target and c not in dropped]
    if not config.data.infer_features:
        names = [c for c in names if c in declared]
    missing = sorted(set(declared) - set(frame.columns))
    if missing:
        raise ValueError(f"declared features not in the data: {', '.join(missing)}")
    features: list[FeatureSpec] = []
    for name in names:
        decl = declared.get(name)
        kind = decl.kind if decl else infer_kind(frame[name])
        transform = decl.transform if decl else "none"
        buckets = decl.buckets if decl and kind == "numeric" else 0
        column = frame[name]
        categories = sorted(column.dropna().astype(str).unique().tolist()) if kind == "categorical" else []
        features.append(
            FeatureSpec(
                name=name,
                kind=kind,
                transform=transform,
                buckets=buckets,
                categories=categories,
                nullable=bool(column.isna().any()),
            )
        )
    if not features:
        raise ValueError("the data set has no feature columns besides the target")
    classes = None
    if config.task == "classification":
        classes = sorted(frame[target].dropna().astype(str).unique().tolist())
        if len(classes) < 2:
            raise ValueError(f"target {target!r} has fewer than two classes")
    return DataSchema(task=config.task, target=target, features=features, classes=classes)
