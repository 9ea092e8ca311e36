"""The prediction form is derived from the API's description of the served model."""

import pytest

from ui.form import FieldSpec, example_row, form_fields, form_schema, row_from_values

CURRENT = {
    "name": "adult-income",
    "version": "7",
    "task": "classification",
    "classes": ["<=50K", ">50K"],
    "features": [
        {"name": "age", "kind": "numeric", "categories": [], "nullable": False},
        {"name": "workclass", "kind": "categorical", "categories": ["Private", "State-gov"], "nullable": True},
        {"name": "sex", "kind": "categorical", "categories": ["Female", "Male"], "nullable": False},
        {"name": "city", "kind": "categorical", "categories": [], "nullable": False},
        {"name": "hours_per_week", "kind": "numeric", "categories": [], "nullable": False},
    ],
}
OPENAPI = {
    "components": {
        "schemas": {
            "PredictRequest": {
                "examples": [{"instances": [{"age": 39, "workclass": "State-gov", "sex": "Other", "extra": 1}]}]
            }
        }
    }
}


def test_fields_follow_the_model_schema_in_order():
    fields = form_fields(CURRENT, example_row(OPENAPI))
    assert [f.name for f in fields] == ["age", "workclass", "sex", "city", "hours_per_week"]
    assert [f.kind for f in fields] == ["numeric", "categorical", "categorical", "text", "numeric"]
    # Categorical features become dropdowns with their known values.
    assert fields[1].choices == ("Private", "State-gov") and fields[1].nullable


def test_defaults_come_from_the_openapi_example_when_they_fit():
    age, workclass, sex, city, hours = form_fields(CURRENT, example_row(OPENAPI))
    assert age.default == 39.0 and workclass.default == "State-gov"
    assert sex.default == "Female"  # "Other" is not a known category: the first one instead
    assert city.default == "" and hours.default == 0.0


def test_no_example_in_the_openapi_description():
    assert example_row({}) == {}
    assert example_row({"components": {"schemas": {"PredictRequest": {"examples": [{"instances": []}]}}}}) == {}
    assert form_fields(CURRENT)[0].default == 0.0


def test_row_from_values_types_each_field():
    fields = form_fields(CURRENT)
    row = row_from_values(fields, (39.0, "Private", "Male", "Paris", 40.5))
    assert row == {"age": 39, "workclass": "Private", "sex": "Male", "city": "Paris", "hours_per_week": 40.5}
    assert isinstance(row["age"], int)
    # Empty inputs go out as null; the API decides whether that is allowed and says which field.
    assert row_from_values(fields, (None, "", None, "", None)) == dict.fromkeys(row)


def test_row_from_values_needs_one_value_per_field():
    with pytest.raises(ValueError, match="5 fields but 2 values"):
        row_from_values(form_fields(CURRENT), (1, 2))


def test_form_schema_is_hashable_state_and_plain_data():
    schema = form_schema(CURRENT, OPENAPI)
    assert schema.model == "adult-income v7" and schema.classes == ("<=50K", ">50K")
    hash(schema)  # Gradio hashes session state to notice changes
    data = schema.as_dict()
    assert data["fields"][1] == {
        "name": "workclass",
        "kind": "categorical",
        "choices": ["Private", "State-gov"],
        "default": "State-gov",
        "nullable": True,
    }
    assert FieldSpec(**{**data["fields"][0], "choices": ()}) == schema.fields[0]
