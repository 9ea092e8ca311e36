"""The serving path's rules for one feature value over Arrow columns, for batch scoring
(jobs/batch_predict.py).

`FeatureRules.check_value` (jobs/schema.py) is the rule serve_apps/validation.py applies to each
value of a request. Batch inputs are files, not JSON, so their cells are first turned into
the values a request would carry: CSV text in a numeric column is read as a number when it is one,
an integer column of a categorical feature becomes text, a null cell is null. Each column is
checked in a few vectorised passes; only the values those passes cannot clear go through
`check_value`, which decides and words the reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from jobs.schema import FeatureRules, FeatureSpec

# Text that reads as "not a number" rather than as no number at all: a request's NaN, refused as
# not finite, not as "must be a number".
_NAN_SPELLINGS = frozenset({"nan", "+nan", "-nan"})


def is_text(kind: pa.DataType) -> bool:
    return bool(pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind))


def column_problem(spec: FeatureSpec, kind: pa.DataType, text_numbers: bool = False) -> str | None:
    """Why a column of this Arrow type cannot feed the feature at all (the job fails), or None.
    `text_numbers`: numeric features may come as text (CSV, where every cell is text)."""
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if spec.kind == "numeric":
        numbers = pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind)
        if numbers or pa.types.is_null(kind) or (text_numbers and is_text(kind)):
            return None
        return f"is {kind}; the model's feature {spec.name!r} is numeric (an integer or floating-point column)"
    if is_text(kind) or pa.types.is_integer(kind) or pa.types.is_null(kind):
        return None
    return f"is {kind}; the model's feature {spec.name!r} is categorical (a text column, or integer codes)"


@dataclass
class ColumnCheck:
    """One feature's column: what the model's preprocessing takes, and the rows refused with why.

    `values`: float64 for a numeric feature (NaN where null); for a categorical one the category's
    1-based position in the schema and 0 for null, the codes `Preprocessor.encode` gives. Refused
    rows hold anything."""

    values: np.ndarray
    refused: np.ndarray  # bool per row
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)  # row -> (type, message)


def _plain(column: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    return column


def _decide(rules: FeatureRules, name: str, rows: np.ndarray, values: list[Any]) -> dict[int, tuple[str, str]]:
    """The rule's verdict on the values the vectorised passes left in doubt: row -> (type, message)."""
    errors: dict[int, tuple[str, str]] = {}
    for row, value in zip(rows.tolist(), values, strict=True):
        error = rules.check_value(name, value)
        if error is not None:
            errors[row] = error
    return errors


def _refused(rows: int, errors: dict[int, tuple[str, str]]) -> np.ndarray:
    refused = np.zeros(rows, dtype=bool)
    refused[list(errors)] = True
    return refused


def check_numeric(rules: FeatureRules, spec: FeatureSpec, column: pa.Array | pa.ChunkedArray) -> ColumnCheck:
    column = _plain(column)
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    text = None
    if is_text(column.type):
        text = column.to_numpy(zero_copy_only=False)
        numbers = pd.to_numeric(pd.Series(text, dtype=object), errors="coerce").to_numpy(np.float64, na_value=np.nan)
    else:
        # Unsafe: an integer beyond 2**53 becomes the nearest double, as a JSON number would.
        numbers = pc.cast(column, pa.float64(), safe=False).to_numpy(zero_copy_only=False)
    doubt = np.flatnonzero(~np.isfinite(numbers))
    values: list[Any] = []
    for row in doubt.tolist():
        if nulls[row]:
            values.append(None)
        elif text is None or math.isinf(numbers[row]):
            values.append(float(numbers[row]))
        else:
            cell = str(text[row])
            values.append(float("nan") if cell.strip().lower() in _NAN_SPELLINGS else cell)
    errors = _decide(rules, spec.name, doubt, values)
    return ColumnCheck(numbers, _refused(len(column), errors), errors)


def _text_dictionary_chunks(column: pa.Array | pa.ChunkedArray) -> list[pa.DictionaryArray] | None:
    """The column's chunks when every one is dictionary-encoded text, else None."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    if not chunks or not all(isinstance(c, pa.DictionaryArray) and is_text(c.type.value_type) for c in chunks):
        return None
    return chunks


def _dictionary_codes(spec: FeatureSpec, chunks: list[pa.DictionaryArray]) -> np.ndarray:
    """The preprocessing's codes of dictionary-encoded text: each chunk's few distinct values
    looked up once, then spread to its rows by their indices (0 for a null or an unknown value)."""
    codes = []
    for chunk in chunks:
        values = chunk.dictionary
        position = pc.index_in(values, value_set=pa.array(spec.categories, type=values.type))
        per_value = np.append(pc.fill_null(pc.add(position, 1), 0).to_numpy(zero_copy_only=False), 0)
        # A null row points past the values, at the 0 appended.
        indices = pc.fill_null(chunk.indices, len(values)).to_numpy(zero_copy_only=False)
        codes.append(per_value[indices].astype(np.int64))
    return np.concatenate(codes)


def check_categorical(rules: FeatureRules, spec: FeatureSpec, column: pa.Array | pa.ChunkedArray) -> ColumnCheck:
    chunks = _text_dictionary_chunks(column)
    if chunks is not None:
        codes = _dictionary_codes(spec, chunks)
        doubt = np.flatnonzero(codes == 0)
        values = pc.take(column, pa.array(doubt, type=pa.int64())).to_pylist() if len(doubt) else []
        errors = _decide(rules, spec.name, doubt, values)
        return ColumnCheck(codes, _refused(len(column), errors), errors)
    column = _plain(column)
    text = column if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else None
    text = text if text is not None else pc.cast(column, pa.string())
    # Null for a null and for an unknown category: both go to the rule, which refuses the latter.
    position = pc.index_in(text, value_set=pa.array(spec.categories, type=text.type))
    codes = pc.fill_null(pc.add(position, 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    doubt = np.flatnonzero(codes == 0)
    values = pc.take(text, pa.array(doubt, type=pa.int64())).to_pylist() if len(doubt) else []
    errors = _decide(rules, spec.name, doubt, values)
    return ColumnCheck(codes, _refused(len(column), errors), errors)


def check_column(
    rules: FeatureRules, spec: FeatureSpec, column: pa.Array | pa.ChunkedArray, text_numbers: bool = False
) -> ColumnCheck:
    """The feature's column checked with the serving path's rules (see the module's docstring)."""
    problem = column_problem(spec, column.type, text_numbers)
    if problem is not None:
        raise ValueError(f"column {spec.name!r} {problem}")
    if spec.kind == "numeric":
        return check_numeric(rules, spec, column)
    return check_categorical(rules, spec, column)


@dataclass
class TableCheck:
    """A batch's features checked: the model's input for the accepted rows, and for each refused
    row the first field at fault (in the model's feature order), its error and every field at fault."""

    accepted: np.ndarray  # bool per row
    features: dict[str, np.ndarray]  # feature name -> values (ColumnCheck.values) of the accepted rows
    refused_rows: np.ndarray  # int64 row indices
    first_field: list[str]
    first_error: list[str]
    first_reason: list[str]
    fields: list[list[str]]


def check_table(
    rules: FeatureRules, columns: dict[str, pa.Array | pa.ChunkedArray], rows: int, text_numbers: bool = False
) -> TableCheck:
    """Check every feature; `columns` maps each feature name of the schema to its input column."""
    refused = np.zeros(rows, dtype=bool)
    checks: dict[str, ColumnCheck] = {}
    for spec in rules.schema.features:
        check = check_column(rules, spec, columns[spec.name], text_numbers)
        checks[spec.name] = check
        refused |= check.refused
    accepted = ~refused
    refused_rows = np.flatnonzero(refused)
    first_field, first_error, first_reason, fields = [], [], [], []
    for row in refused_rows.tolist():
        at_fault = [(name, check.errors[row]) for name, check in checks.items() if row in check.errors]
        name, (kind, message) = at_fault[0]
        first_field.append(name)
        first_error.append(kind)
        first_reason.append(message)
        fields.append([name for name, _ in at_fault])
    features = {name: check.values[accepted] if len(refused_rows) else check.values for name, check in checks.items()}
    return TableCheck(accepted, features, refused_rows, first_field, first_error, first_reason, fields)
