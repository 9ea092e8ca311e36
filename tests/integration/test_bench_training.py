"""The training benchmark's quick mode: plain PyTorch, Ray Train on 1 and 2 workers and a small Tune
search all train, on the same rows, and report figures the full run would print.

No stack: the benchmark starts (and stops) its own local Ray, with a throwaway MLflow store.
No timing assertions: this machine's load decides those.
"""

import json
import math

import pytest
import ray

from benchmarks.training import QUICK_TRAIN_ROWS, run

# Minutes of training on a machine the other tests share; the figures belong to `make bench`, and
# this keeps its training section from rotting: `make test-extended`.
pytestmark = [pytest.mark.integration, pytest.mark.extended, pytest.mark.timeout(600)]
TRAINING = ("plain", "ray_train_1", "ray_train_2")


@pytest.fixture(scope="module")
def result():
    out = run(quick=True)
    assert not ray.is_initialized()  # it shut its Ray down
    return out


def test_every_variant_trained_the_same_rows_for_the_same_epochs(result):
    rows = {name: result[name]["rows_per_epoch"] for name in TRAINING}
    assert set(rows.values()) == {QUICK_TRAIN_ROWS}, rows
    for name in TRAINING:
        variant = result[name]
        assert variant["epochs"] == 2, name
        assert variant["epoch_rows"] == [QUICK_TRAIN_ROWS] * 2, name


def test_the_ray_variants_used_their_workers(result):
    assert result["plain"]["workers"] == 1
    assert result["ray_train_1"]["workers"] == 1
    assert result["ray_train_2"]["workers"] == 2


def test_figures_are_positive_and_curves_finite(result):
    for name in TRAINING:
        variant = result[name]
        assert len(variant["epoch_rows_per_s"]) == 2 and min(variant["epoch_rows_per_s"]) > 0, name
        assert variant["steady_rows_per_s"] > 0 and variant["steady_rows_per_s_incl_report"] > 0, name
        assert variant["wall_s"] >= variant["fit_s"] > 0, name
        for curve in ("train_loss", "val_loss", "val_accuracy"):
            assert len(variant[curve]) == 2 and all(math.isfinite(v) for v in variant[curve]), (name, curve)
        assert all(0 <= v <= 1 for v in variant["val_accuracy"]), name
    for name in ("ray_train_1", "ray_train_2"):
        assert result[name]["startup_s"] > 0 and result[name]["wall_includes_ray_startup"]
        ratios = result["ratios"][name]
        assert ratios["steady_throughput"] > 0 and ratios["wall"] > 0


def test_tune_completed_its_trials(result):
    tune = result["tune"]
    assert tune["trials"] == tune["trials_started"] == 2
    assert tune["epochs_per_trial"] == 1
    assert tune["trials_per_min"] > 0 and tune["wall_s"] > 0


def test_result_is_json(result):
    assert json.loads(json.dumps(result))["ray_train_2"]["workers"] == 2
