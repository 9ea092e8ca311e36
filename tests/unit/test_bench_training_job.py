"""The training-job bench's summary (benchmarks/training_job.py): the ratios the performance notes
quote, the floor's among them, are medians over the rounds of each variant."""

from __future__ import annotations

import pytest

from benchmarks.training_job import summarise


def _run(variant: str, wall: float, phases: dict[str, float] | None = None) -> dict[str, object]:
    return {"variant": variant, "round": 0, "wall_s": wall, "phases": phases or {}}


def test_the_job_and_the_floor_are_each_compared_with_the_plain_job_by_median():
    runs = [
        _run("job", 18.0, {"fit_epochs": 3.0}),
        _run("plain", 4.0, {"fit": 3.0}),
        _run("floor", 10.0),
        _run("job", 20.0, {"fit_epochs": 5.0}),
        _run("plain", 6.0, {"fit": 5.0}),
        _run("floor", 12.0),
        _run("job", 22.0, {"fit_epochs": 4.0}),
        _run("plain", 5.0, {"fit": 4.0}),
        _run("floor", 14.0),
    ]
    figures = summarise(runs)
    assert figures["rounds"] == 3
    assert figures["ratio"] == pytest.approx(20.0 / 5.0)
    assert figures["floor_wall_s"] == pytest.approx(12.0)
    assert figures["floor_ratio"] == pytest.approx(12.0 / 5.0)
    assert figures["job_phases_s"] == {"fit_epochs": 4.0}
    assert figures["plain_phases_s"] == {"fit": 4.0}


def test_without_a_floor_run_the_floor_is_not_made_up():
    figures = summarise([_run("job", 18.0), _run("plain", 4.0)])
    assert figures["floor_wall_s"] is None and figures["floor_ratio"] is None
    assert figures["ratio"] == pytest.approx(4.5)
