"""A version's serving contract: what the champion's clients send and receive must stay valid."""

import pytest

from jobs.compatibility import contract_changes
from jobs.schema import DataSchema, FeatureSpec


def _schema(**changes) -> DataSchema:
    base = {
        "task": "classification",
        "target": "income",
        "classes": ["<=50K", ">50K"],
        "features": [
            FeatureSpec(name="age", kind="numeric", buckets=64),
            FeatureSpec(name="workclass", kind="categorical", categories=["Private", "State-gov"], nullable=True),
            FeatureSpec(name="sex", kind="categorical", categories=["Female", "Male"]),
        ],
    }
    return DataSchema.model_validate({**base, **changes})


def _categorical(name: str, *categories: str, nullable: bool = False) -> FeatureSpec:
    return FeatureSpec(name=name, kind="categorical", categories=list(categories), nullable=nullable)


def _features(*replacements: FeatureSpec, drop: tuple[str, ...] = ()) -> list[FeatureSpec]:
    by_name = {f.name: f for f in _schema().features if f.name not in drop}
    by_name.update({f.name: f for f in replacements})
    return list(by_name.values())


def test_the_same_contract_has_no_changes():
    assert contract_changes(_schema(), _schema()) == []


@pytest.mark.parametrize(
    ("candidate", "change"),
    [
        (_schema(task="regression", classes=None), "task changed: classification -> regression"),
        (_schema(target="salary"), "target changed: 'income' -> 'salary'"),
        (_schema(classes=["<=50K", ">50K", "unknown"]), "classes changed: added unknown"),
        (_schema(classes=["low", "high"]), "classes changed: removed <=50K, >50K; added high, low"),
        (_schema(features=_features(drop=("sex",))), "features removed or renamed: sex"),
        (
            _schema(features=[*_features(), FeatureSpec(name="hours", kind="numeric")]),
            "features added (the champion's clients do not send them): hours",
        ),
        (
            _schema(features=_features(FeatureSpec(name="age", kind="categorical", categories=["17"]))),
            "feature 'age' changed kind: numeric -> categorical",
        ),
        (
            _schema(features=_features(_categorical("workclass", "Private", "State-gov"))),
            "feature 'workclass' no longer accepts null",
        ),
        (
            _schema(features=_features(FeatureSpec(name="sex", kind="categorical", categories=["Female"]))),
            "feature 'sex' lost categories: Male",
        ),
    ],
    ids=["task", "target", "class-added", "classes-replaced", "feature-removed", "feature-added", "kind", "nullable",
         "category-lost"],
)  # fmt: skip
def test_each_incompatibility_is_named(candidate, change):
    assert contract_changes(_schema(), candidate) == [change]


def test_a_renamed_feature_is_both_removed_and_added():
    renamed = _schema(
        features=_features(FeatureSpec(name="gender", kind="categorical", categories=["F"]), drop=("sex",))
    )
    assert contract_changes(_schema(), renamed) == [
        "features removed or renamed: sex",
        "features added (the champion's clients do not send them): gender",
    ]


def test_another_task_lists_every_difference():
    other = DataSchema(
        task="classification",
        target="risk",
        classes=["high", "low", "medium"],
        features=[FeatureSpec(name="mileage", kind="numeric"), FeatureSpec(name="fuel", kind="categorical")],
    )
    changes = contract_changes(_schema(), other)
    assert changes[0] == "target changed: 'income' -> 'risk'"
    assert changes[1].startswith("classes changed: removed <=50K, >50K; added high, low, medium")
    assert "features removed or renamed: age, workclass, sex" in changes
    assert "features added (the champion's clients do not send them): mileage, fuel" in changes


@pytest.mark.parametrize(
    "candidate",
    [
        _schema(classes=[">50K", "<=50K"]),  # labels are answered by name, not position
        _schema(features=_features(FeatureSpec(name="sex", kind="categorical", categories=["Female", "Male", "X"]))),
        _schema(features=_features(_categorical("sex", "Female", "Male", nullable=True))),
        _schema(features=_features(FeatureSpec(name="age", kind="numeric", transform="log1p", buckets=0))),
        _schema(features=list(reversed(_schema().features))),
    ],
    ids=["class-order", "category-added", "null-allowed", "transform-and-buckets", "feature-order"],
)  # fmt: skip
def test_widening_and_internal_changes_are_compatible(candidate):
    assert contract_changes(_schema(), candidate) == []


def test_long_lists_are_shortened():
    many = _schema(features=[FeatureSpec(name=f"f{i}", kind="numeric") for i in range(20)])
    changes = contract_changes(many, _schema())
    assert changes[0] == "features removed or renamed: f0, f1, f2, f3, f4, f5, f6, f7 and 12 more"
