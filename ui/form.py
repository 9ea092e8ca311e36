"""The prediction form, derived from the served model's schema (`GET /v1/models/current`), with
starting values from the example in the API's OpenAPI description. No model code involved."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

FieldKind = Literal["numeric", "categorical", "text"]


@dataclass(frozen=True)
class FieldSpec:
    """One input of the form: a number, a choice among known categories, or free text."""

    name: str
    kind: FieldKind
    choices: tuple[str, ...] = ()
    default: str | float | None = None
    nullable: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "choices": list(self.choices)}


@dataclass(frozen=True)
class FormSchema:
    """What the page builds its form and feedback buttons from. Immutable and hashable: Gradio
    hashes session state to notice changes."""

    fields: tuple[FieldSpec, ...]
    classes: tuple[str, ...]
    task: str
    model: str  # e.g. "adult-income v3", shown above the form
    name: str = ""  # the registered model the form predicts with, e.g. "adult-income"

    def as_dict(self) -> dict[str, Any]:
        fields = [f.as_dict() for f in self.fields]
        return {
            "fields": fields,
            "classes": list(self.classes),
            "task": self.task,
            "model": self.model,
            "name": self.name,
        }


def form_schema(current: dict[str, Any], openapi: dict[str, Any]) -> FormSchema:
    """The form of the served model `current` describes; the OpenAPI example (the default
    model's) supplies starting values only for the fields it names."""
    fields = form_fields(current, example_row(openapi))
    name = str(current.get("name", ""))
    model = f"{name or 'model'} v{current.get('version', '?')}"
    classes = tuple(str(c) for c in current.get("classes") or [])
    return FormSchema(tuple(fields), classes, str(current.get("task", "")), model, name)


def example_row(openapi: dict[str, Any]) -> dict[str, Any]:
    """The first example instance of `PredictRequest` in the OpenAPI description, if any."""
    schema = openapi.get("components", {}).get("schemas", {}).get("PredictRequest", {})
    for example in schema.get("examples", []):
        instances = example.get("instances") if isinstance(example, dict) else None
        if instances and isinstance(instances[0], dict):
            return dict(instances[0])
    return {}


def _default(kind: FieldKind, choices: tuple[str, ...], example: Any) -> str | float | None:
    if kind == "numeric":
        return float(example) if isinstance(example, int | float) and not isinstance(example, bool) else 0.0
    if example is not None and (not choices or str(example) in choices):
        return str(example)
    return choices[0] if choices else ""


def field_spec(feature: dict[str, Any], example: dict[str, Any]) -> FieldSpec:
    name = str(feature["name"])
    choices = tuple(str(c) for c in feature.get("categories") or [])
    kind: FieldKind = "numeric" if feature.get("kind") == "numeric" else "categorical" if choices else "text"
    nullable = bool(feature.get("nullable", False))
    return FieldSpec(name, kind, choices, _default(kind, choices, example.get(name)), nullable)


def form_fields(current: dict[str, Any], example: dict[str, Any] | None = None) -> list[FieldSpec]:
    """Fields in the model's feature order; the example only supplies starting values."""
    return [field_spec(f, example or {}) for f in current.get("features", [])]


def _number(value: Any) -> int | float | None:
    if value is None or value == "":
        return None
    number = float(value)
    # The form's number boxes give floats; integral values go out as integers, as a caller would.
    return int(number) if math.isfinite(number) and number.is_integer() else number


def row_from_values(fields: Sequence[FieldSpec], values: list[Any] | tuple[Any, ...]) -> dict[str, Any]:
    """The instance to send. Empty inputs go out as null: the API says whether that is allowed."""
    if len(fields) != len(values):
        raise ValueError(f"the form has {len(fields)} fields but {len(values)} values were given")
    row: dict[str, Any] = {}
    for spec, value in zip(fields, values, strict=True):
        if spec.kind == "numeric":
            row[spec.name] = _number(value)
        else:
            row[spec.name] = None if value is None or value == "" else str(value)
    return row
