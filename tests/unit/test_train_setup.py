"""What Ray Train starts for a training job: `jobs.train.trainer_class` leaves out the helpers a
standalone run does not need, and only those (no cluster: the callbacks are listed, not run)."""

import os
from pathlib import Path
from typing import Any

from ray.train import RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.backend_setup import BackendSetupCallback
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from jobs.train import trainer_class


def callback_kinds(standalone: bool, ray_data: bool, tmp_path: Path) -> set[type[Any]]:
    trainer = trainer_class(standalone=standalone, ray_data=ray_data)(
        lambda: None,
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="callbacks", storage_path=str(tmp_path)),
    )
    return {type(c) for c in trainer._create_default_callbacks()}


def test_a_standalone_run_without_ray_data_starts_neither_cleaner_nor_datasets_manager(tmp_path):
    kinds = callback_kinds(standalone=True, ray_data=False, tmp_path=tmp_path)
    assert BackendSetupCallback in kinds  # the process group and the rest stay
    assert not kinds & {PlacementGroupCleanerCallback, DatasetsCallback}


def test_a_tune_trial_keeps_the_cleaner_and_ray_data_keeps_its_manager(tmp_path):
    trial = callback_kinds(standalone=False, ray_data=False, tmp_path=tmp_path)
    assert PlacementGroupCleanerCallback in trial and DatasetsCallback not in trial
    streamed = callback_kinds(standalone=True, ray_data=True, tmp_path=tmp_path)
    assert DatasetsCallback in streamed and PlacementGroupCleanerCallback not in streamed
    assert {PlacementGroupCleanerCallback, DatasetsCallback} <= callback_kinds(False, True, tmp_path)


def test_a_default_for_ray_train_holds_during_the_run_and_a_user_setting_wins(monkeypatch):
    from jobs.train import PREEMPTION_WATCHER_ENV, _environment_default

    monkeypatch.delenv(PREEMPTION_WATCHER_ENV, raising=False)
    with _environment_default(PREEMPTION_WATCHER_ENV, "0"):
        assert os.environ[PREEMPTION_WATCHER_ENV] == "0"
    assert PREEMPTION_WATCHER_ENV not in os.environ
    with _environment_default(PREEMPTION_WATCHER_ENV, None):  # a Tune trial keeps Ray's default
        assert PREEMPTION_WATCHER_ENV not in os.environ
    monkeypatch.setenv(PREEMPTION_WATCHER_ENV, "1")
    with _environment_default(PREEMPTION_WATCHER_ENV, "0"):
        assert os.environ[PREEMPTION_WATCHER_ENV] == "1"
