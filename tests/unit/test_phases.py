"""A job's phases: what the result line and the MLflow run say about where its time went."""

from __future__ import annotations

import time

from jobs.phases import Phases, WorkerTimings, fit_phases, since_process_start


def test_a_phase_timed_twice_adds_up_and_keeps_its_first_place():
    phases = Phases()
    with phases.timed("load"):
        time.sleep(0.01)
    phases.add("fit", 2.0)
    with phases.timed("load"):
        time.sleep(0.01)
    assert list(phases.durations) == ["load", "fit"]
    assert 0.02 <= phases.durations["load"] < 1.0
    assert phases.metrics()["phase_fit_s"] == 2.0


def test_the_train_run_is_cut_into_phases_that_add_up_to_its_wall_time():
    worker = WorkerTimings(loop_started=103.0, ready=104.5, epoch_s=[1.0, 1.0], logging_s=[0.1, 0.1], report_s=[0.3])
    phases = fit_phases(100.0, 110.0, worker)
    assert phases["fit_worker_start"] == 3.0
    assert phases["fit_worker_setup"] == 1.5
    assert phases["fit_epochs"] == 2.0
    assert round(phases["fit_epoch_logging"], 6) == 0.2
    assert phases["fit_reports"] == 0.3
    assert round(sum(phases.values()), 6) == 10.0  # fit_finish is the rest: the last report and shutdown


def test_worker_timings_survive_the_checkpoint_and_an_older_checkpoint_is_one_phase():
    worker = WorkerTimings(loop_started=1.0, ready=2.0, epoch_s=[0.5])
    assert WorkerTimings.from_dict(worker.as_dict()) == worker
    assert fit_phases(0.0, 4.0, None) == {"fit": 4.0}


def test_the_process_start_is_before_now():
    assert 0 < since_process_start() < 24 * 3600
