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
