import numpy as np
import pandas as pd
import torch

from jobs.config import DataConfig, JobConfig
from jobs.model import TabularMLP
from jobs.predictor import TabularPredictor
from tests.predictors import untrained_predictor


def test_forward_shapes_classification_and_regression():
    model = TabularMLP([5, 3], n_numeric=4, n_outputs=3, hidden=[16, 8]).eval()
    out = model(torch.randint(0, 3, (7, 2)), torch.randn(7, 4))
    assert out.shape == (7, 3)
    regression = TabularMLP([], n_numeric=2, n_outputs=1, hidden=[8]).eval()
    assert regression(torch.zeros((5, 0), dtype=torch.long), torch.randn(5, 2)).shape == (5, 1)


def _predictor(task="classification"):
    frame = pd.DataFrame(
        {"c": ["a", "b", "a", "b"] * 5, "n": np.linspace(0, 1, 20), "y": ["p", "q", "r", "p"] * 5}
        if task == "classification"
        else {"c": ["a", "b", "a", "b"] * 5, "n": np.linspace(0, 1, 20), "y": np.linspace(5, 9, 20)}
    )
    config = JobConfig(name="t", task=task, data=DataConfig(train_uri="x", target="y"))
    return untrained_predictor(frame, config), frame


def test_predict_frame_gives_label_and_probabilities():
    predictor, frame = _predictor()
    result = predictor.predict_frame(frame.drop(columns="y"))
    assert len(result) == len(frame)
    assert set(result["label"]) <= {"p", "q", "r"}
    probs = result[["p_p", "p_q", "p_r"]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert np.allclose(result["probability"], probs.max(axis=1))


def test_regression_predicts_values_in_target_units():
    predictor, frame = _predictor("regression")
    result = predictor.predict_frame(frame)
    assert list(result.columns) == ["value"]
    assert result["value"].between(-100, 100).all()


def test_save_and_load_give_identical_outputs(tmp_path):
    predictor, frame = _predictor()
    loaded = TabularPredictor.load(predictor.save(tmp_path / "p"))
    assert np.allclose(predictor.raw_outputs(frame), loaded.raw_outputs(frame))


def test_encode_records_matches_the_dataframe_encoder():
    """The serving path encodes JSON rows without pandas; it must give the codes and values that
    training's encoder gives, for known, unseen, missing and string-typed values."""
    predictor, frame = _predictor()
    pre = predictor.preprocessor
    rows = frame.drop(columns="y").to_dict("records")
    rows += [{"c": "unseen", "n": 0.5}, {"c": None, "n": None}, {"c": "a", "n": "0.25"}, {"c": 3, "n": 1}]
    by_frame = pre.encode(pd.DataFrame.from_records(rows))
    by_records = pre.encode_records(rows)
    assert np.array_equal(by_frame.x_cat, by_records.x_cat)
    assert np.allclose(by_frame.x_num, by_records.x_num)
    assert by_records.x_cat[-3, 0] == 0  # missing and unseen share the reserved code
    assert np.allclose(predictor.record_outputs(rows), predictor.raw_outputs(pd.DataFrame.from_records(rows)))


def test_served_predictions_name_the_most_likely_class():
    from serve_apps.champion import to_predictions

    outputs = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1]], dtype=np.float32)
    predictions = to_predictions(outputs, "classification", ["p", "q", "r"])
    assert [p["label"] for p in predictions] == ["q", "p"]
    assert predictions[0]["probability"] == predictions[0]["probabilities"]["q"]
    assert set(predictions[1]["probabilities"]) == {"p", "q", "r"}
    assert to_predictions(np.array([1.5, -2.0]), "regression", None) == [{"value": 1.5}, {"value": -2.0}]
