"""Row validation against the served model's schema, with errors that name the field."""

from __future__ import annotations

import math
from typing import Any

from jobs.schema import DataSchema

MAX_REPORTED_ERRORS = 20


def _error(row: int, field: str | None, msg: str, kind: str) -> dict[str, Any]:
    loc: list[Any] = ["body", "instances", row]
    if field is not None:
        loc.append(field)
    return {"loc": loc, "msg": msg, "type": kind}


class RowValidator:
    """Precomputed per schema so each request costs a few dict and set look-ups per value."""

    def __init__(self, schema: DataSchema) -> None:
        self.schema = schema
        self._feature_names = schema.feature_names  # a property that builds a new list per call
        self._names = set(self._feature_names)
        self._categories = {f.name: frozenset(f.categories) for f in schema.categorical}
        self._allowed = {name: categories | {None} for name, categories in self._categories.items()}
        self._numeric = {f.name for f in schema.numeric}
        self._nullable = {f.name for f in schema.features if f.nullable}

    def validate(self, rows: list[Any]) -> list[dict[str, Any]]:
        if self._all_valid(rows):
            return []
        errors: list[dict[str, Any]] = []
        for i, row in enumerate(rows):
            errors.extend(self._validate_row(i, row))
            if len(errors) >= MAX_REPORTED_ERRORS:
                return errors[:MAX_REPORTED_ERRORS]
        return errors

    def _validate_row(self, i: int, row: Any) -> list[dict[str, Any]]:
        if not isinstance(row, dict):
            return [_error(i, None, "each instance must be an object of feature values", "type_error")]
        errors = [
            _error(i, str(name), "unknown field; the model has no such feature", "extra_forbidden")
            for name in row.keys() - self._names
        ]
        for name in self._feature_names:
            if name not in row:
                # Even nullable features must be sent (as null): a silently missing key is
                # usually a typo, and the model would quietly predict without it.
                errors.append(
                    _error(
                        i,
                        name,
                        "field required (send null if unknown)" if name in self._nullable else "field required",
                        "missing",
                    )
                )
                continue
            message = self._check_value(name, row[name])
            if message:
                errors.append(_error(i, name, message[1], message[0]))
        return errors

    def _all_valid(self, rows: list[Any]) -> bool:
        """The common case in a few C-level passes per column instead of a call per value; any
        doubt falls through to the per-row checks, which name the field."""
        names = self._names
        if not all(type(row) is dict and row.keys() == names for row in rows):
            return False
        for name in self._feature_names:
            values = [row[name] for row in rows]
            if name in self._numeric:
                # bool is an int subclass: type() (not isinstance) keeps true/false out.
                # JSON integers have no size limit: isfinite() raises for one beyond float64's range,
                # which would otherwise fail the model's float conversion for the whole joined batch.
                try:
                    if not all(
                        ((type(v) is int or type(v) is float) and math.isfinite(v)) or v is None for v in values
                    ):
                        return False
                except OverflowError:
                    return False
            else:
                try:
                    if not set(values) <= self._allowed[name]:
                        return False
                except TypeError:  # an unhashable value (a list or an object) in a categorical
                    return False
            if name not in self._nullable and None in values:
                return False
        return True

    def _check_value(self, name: str, value: Any) -> tuple[str, str] | None:
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
