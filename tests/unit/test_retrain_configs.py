"""Which config an accuracy alert retrains: the one that trains the alert's model, or none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.training_jobs.retrain import RetrainConfigError, retrain_config

pytestmark = pytest.mark.unit

TUNE = {"num_samples": 2, "search_space": {"train.lr": {"loguniform": [0.001, 0.01]}}}


def _config(name: str, **top: Any) -> dict[str, Any]:
    return {"name": name, "data": {"train_uri": "data/x.csv", "target": "y"}, **top}


@pytest.fixture
def configs(tmp_path: Path):
    def write(file: str, body: dict[str, Any] | str) -> None:
        text = body if isinstance(body, str) else yaml.safe_dump(body)
        (tmp_path / f"{file}.yaml").write_text(text, encoding="utf-8")

    write("adult", _config("adult-income"))
    write("adult-tune", _config("adult-income", tune=TUNE))
    write("fleet", _config("fleet", model_name="fleet-risk"))
    write("churn", _config("churn"))
    write("churn-v2", _config("churn"))
    return tmp_path, write


def test_the_shipped_configs_retrain_adult_with_its_train_and_its_tune_config():
    assert retrain_config("adult-income", "train", {}) == "adult"
    assert retrain_config("adult-income", "tune", {}) == "adult-tune"


def test_a_model_is_retrained_by_the_config_that_registers_it(configs):
    directory, _ = configs
    # `model_name` decides where a config registers, so it decides which model it retrains.
    assert retrain_config("fleet-risk", "train", {}, directory) == "fleet"
    assert retrain_config("adult-income", "train", {}, directory) == "adult"


def test_a_model_no_config_trains_queues_nothing(configs):
    directory, _ = configs
    with pytest.raises(RetrainConfigError, match=r"no config in jobs/configs trains 'credit'"):
        retrain_config("credit", "train", {}, directory)
    # The config named like the model registers under another name: it is not that model's config.
    with pytest.raises(RetrainConfigError, match=r"trains 'fleet'"):
        retrain_config("fleet", "train", {}, directory)
    with pytest.raises(RetrainConfigError, match=r"trains 'fleet-risk' with a tune section \(only fleet\)"):
        retrain_config("fleet-risk", "tune", {}, directory)


def test_a_model_several_configs_train_needs_the_mapping_to_choose(configs):
    directory, _ = configs
    with pytest.raises(RetrainConfigError, match=r"2 configs train 'churn' \(churn, churn-v2\)"):
        retrain_config("churn", "train", {}, directory)
    assert retrain_config("churn", "train", {"churn": "churn-v2"}, directory) == "churn-v2"


def test_a_mapping_to_another_models_config_is_refused(configs):
    directory, _ = configs
    with pytest.raises(RetrainConfigError, match=r"maps 'churn' to 'adult', which trains 'adult-income'"):
        retrain_config("churn", "train", {"churn": "adult"}, directory)
    with pytest.raises(RetrainConfigError, match=r"maps 'churn' to 'nope', which is not a config"):
        retrain_config("churn", "train", {"churn": "nope"}, directory)
    with pytest.raises(RetrainConfigError, match=r"which is not a config"):
        retrain_config("churn", "train", {"churn": "../adult"}, directory)
    with pytest.raises(RetrainConfigError, match=r"which has no tune section"):
        retrain_config("churn", "tune", {"churn": "churn"}, directory)


def test_an_unreadable_config_refuses_rather_than_guesses(configs):
    directory, write = configs
    write("broken", "name: [unclosed")
    # It might train the alert's model: no answer is safe until it is fixed or the mapping decides.
    with pytest.raises(RetrainConfigError, match=r"config 'broken' cannot be read"):
        retrain_config("fleet-risk", "train", {}, directory)
    assert retrain_config("fleet-risk", "train", {"fleet-risk": "fleet"}, directory) == "fleet"


def test_a_file_that_is_not_a_config_name_is_not_a_candidate(configs):
    directory, write = configs
    write("Fleet Copy", _config("fleet-risk"))
    assert retrain_config("fleet-risk", "train", {}, directory) == "fleet"
