import pytest

from jobs.promote import decide


def test_first_model_is_promoted():
    decision = decide("roc_auc", 0.8, None, 0.0)
    assert decision.promote and decision.reason == "no champion to beat"


@pytest.mark.parametrize(
    ("candidate", "champion", "margin", "promote"),
    [
        (0.91, 0.90, 0.0, True),
        (0.90, 0.90, 0.0, False),
        (0.905, 0.90, 0.01, False),
        (0.92, 0.90, 0.01, True),
        (0.89, 0.90, 0.0, False),
    ],
)
def test_higher_is_better_metric(candidate, champion, margin, promote):
    assert decide("roc_auc", candidate, champion, margin).promote is promote


def test_lower_is_better_metric():
    assert decide("rmse", 1.0, 1.2, 0.1).promote
    assert not decide("rmse", 1.15, 1.2, 0.1).promote
    assert not decide("log_loss", 0.5, 0.4, 0.0).promote


def test_force_overrides_and_says_so():
    decision = decide("roc_auc", 0.5, 0.9, 0.0, champion_version="3", force=True)
    assert decision.promote and "forced" in decision.reason
    assert decision.champion_score == 0.9 and decision.champion_version == "3"
