import pytest
from pydantic import ValidationError

from jobs.config import load_config, parse_override


def test_overrides_apply_dotted_paths():
    config = load_config("jobs/configs/adult.yaml").with_overrides(
        dict(parse_override(o) for o in ["train.epochs=2", "promotion.enabled=false", "model.hidden=[8, 4]"])
    )
    assert config.train.epochs == 2
    assert config.promotion.enabled is False
    assert config.model.hidden == [8, 4]


def test_unknown_keys_are_rejected():
    with pytest.raises(ValidationError, match="tain"):
        load_config("jobs/configs/adult.yaml").with_overrides({"tain.epochs": 2})


def test_override_needs_equals():
    with pytest.raises(ValueError, match=r"key\.path=value"):
        parse_override("train.epochs")


def test_default_promotion_metric_follows_task():
    config = load_config("jobs/configs/adult.yaml")
    assert config.promotion_metric == "roc_auc"
    regression = config.with_overrides({"task": "regression", "promotion.metric": None})
    assert regression.promotion_metric == "rmse"


def test_missing_config_file_is_clear():
    with pytest.raises(FileNotFoundError, match=r"nope\.yaml"):
        load_config("jobs/configs/nope.yaml")


def test_a_config_registers_under_its_own_name_unless_it_says_otherwise():
    config = load_config("jobs/configs/adult.yaml")
    assert config.name == "adult-income" and config.registered_model_name == "adult-income"
    other = config.with_overrides({"name": "fleet-risk"})
    assert other.registered_model_name == "fleet-risk"
    assert other.with_overrides({"model_name": "fleet"}).registered_model_name == "fleet"


@pytest.mark.parametrize("key", ["name", "model_name"])
@pytest.mark.parametrize("value", ["", "has space", "a/b", "-lead", "x" * 129])
def test_model_names_are_safe_in_urls_and_labels(key, value):
    with pytest.raises(ValidationError):
        load_config("jobs/configs/adult.yaml").with_overrides({key: value})
