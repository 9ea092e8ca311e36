import math

import pytest

from jobs.schema import DataSchema, FeatureSpec
from serve_apps.validation import RowValidator

SCHEMA = DataSchema(
    task="classification",
    target="y",
    classes=["no", "yes"],
    features=[
        FeatureSpec(name="age", kind="numeric"),
        FeatureSpec(name="color", kind="categorical", categories=["red", "blue"]),
        FeatureSpec(name="country", kind="categorical", categories=["US", "FR"], nullable=True),
    ],
)
VALID = {"age": 30, "color": "red", "country": None}


def errors_of(row):
    return RowValidator(SCHEMA).validate([row])


def test_valid_row_passes():
    assert errors_of(VALID) == []
    assert errors_of({**VALID, "age": 30.5, "country": "FR"}) == []


@pytest.mark.parametrize(
    ("row", "field", "kind"),
    [
        ({"color": "red", "country": None}, "age", "missing"),
        ({"age": 30, "color": "red"}, "country", "missing"),
        ({**VALID, "age": "30"}, "age", "type_error"),
        ({**VALID, "age": True}, "age", "type_error"),
        ({**VALID, "age": math.nan}, "age", "value_error"),
        ({**VALID, "age": math.inf}, "age", "value_error"),
        ({**VALID, "age": 10**400}, "age", "value_error"),
        ({**VALID, "age": -(10**400)}, "age", "value_error"),
        ({**VALID, "age": None}, "age", "null_forbidden"),
        ({**VALID, "color": "green"}, "color", "unknown_category"),
        ({**VALID, "color": 3}, "color", "type_error"),
        ({**VALID, "colour": "red"}, "colour", "extra_forbidden"),
    ],
)
def test_each_kind_of_bad_value_names_its_field(row, field, kind):
    errors = errors_of(row)
    assert len(errors) == 1
    assert errors[0]["loc"] == ["body", "instances", 0, field]
    assert errors[0]["type"] == kind


def test_non_object_rows_are_rejected_with_their_index():
    errors = RowValidator(SCHEMA).validate([VALID, [1, 2]])
    assert errors[0]["loc"] == ["body", "instances", 1]


def test_error_list_is_bounded():
    errors = RowValidator(SCHEMA).validate([{}] * 100)
    assert len(errors) == 20


def test_unknown_category_message_lists_allowed_values():
    (error,) = errors_of({**VALID, "color": "green"})
    assert "red" in error["msg"] and "blue" in error["msg"]


@pytest.mark.parametrize(
    ("field", "bad"),
    [
        ("age", "30"),
        ("age", True),
        ("age", math.nan),
        ("age", None),
        ("color", "green"),
        ("color", ["red"]),
        ("color", None),
        ("country", 3),
    ],
)
def test_one_bad_value_in_a_large_batch_is_named(field, bad):
    """A batch is accepted in bulk only when the per-row checks would accept every row: one bad
    value anywhere sends it to the checks that name the row and the field."""
    validator = RowValidator(SCHEMA)
    rows = [dict(VALID) for _ in range(50)]
    assert validator.validate(rows) == []
    rows[37][field] = bad
    errors = validator.validate(rows)
    assert [e["loc"] for e in errors] == [["body", "instances", 37, field]]


def test_an_extra_field_in_a_large_batch_is_named():
    rows = [dict(VALID) for _ in range(50)]
    rows[3]["colour"] = "red"
    assert [e["loc"] for e in RowValidator(SCHEMA).validate(rows)] == [["body", "instances", 3, "colour"]]
