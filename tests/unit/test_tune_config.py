"""The `tune:` section of a job config: search space parsing, validation and trial configs."""

from typing import Any

import pytest
from pydantic import ValidationError

from jobs.config import Distribution, JobConfig, load_config, parse_override

SPACE: dict[str, dict[Distribution, list[Any]]] = {
    "train.lr": {"loguniform": [5e-4, 1e-2]},
    "model.hidden": {"choice": [[64, 32], [128, 64]]},
    "model.dropout": {"uniform": [0.1, 0.5]},
    "train.batch_size": {"randint": [128, 1025]},
}


def with_tune(**tune) -> JobConfig:
    base = load_config("jobs/configs/adult.yaml").model_dump()
    return JobConfig.model_validate({**base, "tune": {"search_space": SPACE, **tune}})


def test_defaults_fit_a_two_core_machine():
    tc = with_tune().tune
    assert tc is not None
    assert (tc.max_concurrent_trials, tc.trial_workers, tc.metric, tc.mode) == (2, 1, "best_val_loss", "min")
    assert tc.search_space["model.hidden"] == {"choice": [[64, 32], [128, 64]]}


def test_the_shipped_tune_config_loads_and_starts_from_the_train_defaults():
    tuned, plain = load_config("jobs/configs/adult-tune.yaml"), load_config("jobs/configs/adult.yaml")
    assert tuned.tune is not None and tuned.tune.points_to_evaluate
    assert tuned.model_dump(exclude={"tune"}) == plain.model_dump()
    default = tuned.tune.points_to_evaluate[0]
    assert default["train.lr"] == plain.train.lr and default["model.hidden"] == plain.model.hidden


def test_set_reaches_the_tune_section():
    config = load_config("jobs/configs/adult-tune.yaml").with_overrides(
        dict(parse_override(o) for o in ["tune.num_samples=2", "tune.grace_period=1"])
    )
    assert config.tune is not None and (config.tune.num_samples, config.tune.grace_period) == (2, 1)


def test_set_can_add_a_tune_section_to_a_plain_config():
    config = load_config("jobs/configs/adult.yaml").with_overrides(
        {"tune.search_space": {"train.lr": {"uniform": [0.001, 0.01]}}, "tune.num_samples": 3}
    )
    assert config.tune is not None and config.tune.num_samples == 3


def test_a_config_without_tune_dumps_as_before():
    # Training runs log the dumped config: no `tune: null` appears in them.
    assert "tune" not in load_config("jobs/configs/adult.yaml").model_dump(mode="json")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"normal": [0, 1]}, "uniform"),  # the literal error lists the known distributions
        ({"uniform": [0.1, 0.2], "choice": [1]}, "exactly one distribution"),
        ({"uniform": [0.5, 0.1]}, "low < high"),
        ({"uniform": [0.1]}, r"\[low, high\]"),
        ({"loguniform": [0, 0.1]}, "positive lower bound"),
        ({"choice": []}, "at least one option"),
    ],
)
def test_bad_distributions_are_rejected(spec, message):
    base = load_config("jobs/configs/adult.yaml").model_dump()
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate({**base, "tune": {"search_space": {"model.dropout": spec}}})


def test_randint_needs_integer_bounds():
    base = load_config("jobs/configs/adult.yaml").model_dump()
    with pytest.raises(ValidationError, match="integer bounds"):
        JobConfig.model_validate({**base, "tune": {"search_space": {"train.epochs": {"randint": [2.5, 9]}}}})


@pytest.mark.parametrize(
    ("key", "message"),
    [
        ("train.lrr", "train has no field 'lrr'"),
        ("lr", "not a config path"),
        ("data.val_fraction", "not a config path"),  # the data are prepared once for all trials
        ("train.lr.x", "not a config path"),
        ("train.num_workers", "tune.trial_workers"),
    ],
)
def test_keys_must_be_tunable_config_paths(key, message):
    base = load_config("jobs/configs/adult.yaml").model_dump()
    with pytest.raises(ValidationError, match=message):
        JobConfig.model_validate({**base, "tune": {"search_space": {key: {"uniform": [0.1, 0.2]}}}})


def test_values_the_config_would_reject_fail_at_load_time():
    base = load_config("jobs/configs/adult.yaml").model_dump()
    with pytest.raises(ValidationError, match=r"model\.dropout.*less than 1"):
        JobConfig.model_validate({**base, "tune": {"search_space": {"model.dropout": {"choice": [0.2, 1.5]}}}})


def test_an_empty_search_space_is_rejected():
    base = load_config("jobs/configs/adult.yaml").model_dump()
    with pytest.raises(ValidationError, match="search_space"):
        JobConfig.model_validate({**base, "tune": {"search_space": {}}})


def test_points_to_evaluate_are_checked_against_the_space_and_the_config():
    with pytest.raises(ValidationError, match=r"not in search_space"):
        with_tune(points_to_evaluate=[{"train.epochs": 3}])
    with pytest.raises(ValidationError, match=r"points_to_evaluate\[0\]"):
        with_tune(points_to_evaluate=[{"train.lr": -1.0}])
    with pytest.raises(ValidationError, match="more points than num_samples"):
        with_tune(num_samples=1, points_to_evaluate=[{"train.lr": 0.001}, {"train.lr": 0.002}])


def test_accuracy_is_maximised_and_needs_classification():
    tc = with_tune(metric="val_accuracy").tune
    assert tc is not None and tc.mode == "max"
    with pytest.raises(ValidationError, match="not reported for regression"):
        with_tune(metric="val_accuracy").with_overrides({"task": "regression", "promotion.metric": None})
    with pytest.raises(ValidationError, match="metric"):
        with_tune(metric="test_roc_auc")


def test_search_space_becomes_tune_domains_and_list_choices_round_trip():
    from ray.tune.search.sample import Categorical, Float, Integer

    from jobs.tune import decode_params, encode_point, param_space

    space = param_space(SPACE)
    assert isinstance(space["train.lr"], Float) and isinstance(space["train.batch_size"], Integer)
    hidden = space["model.hidden"]
    assert isinstance(hidden, Categorical)
    # Tune would walk a list value as nested parameters: lists travel as JSON text.
    assert hidden.categories == ["[64, 32]", "[128, 64]"]
    point = encode_point({"model.hidden": [128, 64], "train.lr": 0.001})
    assert point == {"model.hidden": "[128, 64]", "train.lr": 0.001}
    assert decode_params(point, SPACE) == {"model.hidden": [128, 64], "train.lr": 0.001}


def test_trial_config_applies_sampled_values_and_trial_workers():
    from jobs.tune import encode_point, max_epochs, trial_config

    config = with_tune(trial_workers=1)
    trial = trial_config(config, encode_point({"model.hidden": [128, 64], "train.lr": 0.004}))
    assert trial.model.hidden == [128, 64] and trial.train.lr == 0.004
    assert trial.train.num_workers == 1 and trial.tune is None
    assert max_epochs(config) == config.train.epochs
    searched = config.with_overrides({"tune.search_space": {**SPACE, "train.epochs": {"randint": [2, 31]}}})
    assert max_epochs(searched) == 30  # randint's upper bound is exclusive


def test_a_point_outside_the_choices_still_decodes():
    from jobs.tune import decode_params, encode_point

    space: dict[str, dict[Distribution, list[Any]]] = {"model.hidden": {"choice": [[128, 64]]}}
    assert decode_params(encode_point({"model.hidden": [64, 32]}), space) == {"model.hidden": [64, 32]}
