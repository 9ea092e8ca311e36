"""`make bench` as a person follows it: a line per phase with the elapsed time and what comes
next, a failed phase's reason and log, everything else in the log, the headline at the end."""

import io
import json

import pytest
import typer

from benchmarks.__main__ import PHASES, SECTIONS, Phase, Run, main, run_phases, selected, steps
from benchmarks.report import SECTIONS as REPORT_SECTIONS
from core.progress import Progress


def test_the_plan_puts_the_shared_stack_around_its_phases_and_the_report_last():
    assert steps(selected(set())) == [
        "stack up",
        "loop",
        "serving",
        "shapes",
        "stack down",
        "training",
        "training_job",
        "batch_predict",
        "monitor",
        "shadow",
        "report",
    ]
    off_stack = ["training", "training_job", "batch_predict", "monitor", "shadow"]
    assert steps(selected({"loop", "serving", "shapes"})) == [*off_stack, "report"]
    assert steps(selected(set(SECTIONS))) == ["report"]


def test_serving_and_shapes_bring_the_loop_whose_model_they_serve():
    names = [phase.name for phase in selected(set(SECTIONS) - {"serving"})]
    assert names == ["loop", "serving"]


def test_an_unknown_section_is_refused_by_name():
    with pytest.raises(typer.BadParameter, match="unknown section"):
        selected({"trainig"})


def test_the_batch_phase_scores_millions_of_rows_and_far_fewer_when_quick(tmp_path, monkeypatch):
    import benchmarks.batch_predict

    calls = []

    def batch_inference(rows, baseline_rows):
        calls.append((rows, baseline_rows))
        return {"rows": rows}

    monkeypatch.setattr(benchmarks.batch_predict, "batch_inference", batch_inference)
    (phase,) = [p for p in PHASES if p.name == "batch_predict"]
    assert not phase.on_stack  # a Ray of its own, on a quiet machine
    assert phase.measure(Run(quick=False, out=tmp_path)) == {"batch_predict": {"rows": 5_000_000}}
    assert phase.measure(Run(quick=True, out=tmp_path)) == {"batch_predict": {"rows": 100_000}}
    assert calls == [(5_000_000, 1_000_000), (100_000, 50_000)]
    assert "batch_predict" in {s.key for s in REPORT_SECTIONS}  # rendered as its own section, not as key/values


def _phases():
    return [
        Phase("training", "plain PyTorch against Ray Train", lambda run: {"training": {"plain": {"wall_s": 1.0}}}),
        Phase("monitor", "the drift monitor", lambda run: {"monitor": {"cost_pct": 1.5, "seen": list(run.results)}}),
    ]


def test_each_phase_is_a_step_that_says_what_comes_next(tmp_path):
    out = io.StringIO()
    phases = _phases()
    run = Run(quick=True, out=tmp_path)
    progress = Progress(steps(phases), out=out, heartbeat_s=None, now=lambda: 0.0)  # durations read 0.0 s
    run_phases(run, phases, progress, tmp_path / "bench.log")
    lines = [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]
    assert lines == [
        "1/3 training: plain PyTorch against Ray Train",
        "1/3 training: done in 0.0 s: results: training; next: monitor",
        "2/3 monitor: the drift monitor",
        "2/3 monitor: done in 0.0 s: results: monitor; next: report",
    ]
    assert run.results["monitor"]["seen"] == ["training"]  # a phase sees what ran before it


def test_a_failing_phase_says_why_and_where_the_log_is(tmp_path):
    def broken(run):
        raise RuntimeError("wrk: connection refused at https://127.0.0.1:20001/v1/predict")

    phases = [Phase("training", "training", broken), *_phases()[1:]]
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(RuntimeError):
        progress = Progress(steps(phases), out, err, heartbeat_s=None, now=lambda: 0.0)
        run_phases(Run(False, tmp_path), phases, progress, tmp_path / "bench.log")
    assert (
        err.getvalue()
        .splitlines()[0]
        .endswith("1/3 training: FAILED after 0.0 s: wrk: connection refused at https://127.0.0.1:20001/v1/predict")
    )
    assert err.getvalue().splitlines()[1].endswith(f"full log: {tmp_path / 'bench.log'}")
    assert "monitor" not in out.getvalue().replace("next: monitor", "")


def test_a_run_prints_progress_on_stderr_and_the_headline_on_stdout(tmp_path, capfd):
    log = tmp_path / "logs" / "bench.log"
    main(quick=True, out=tmp_path / "out", skip=list(SECTIONS), log=log)
    out, err = capfd.readouterr()
    assert out.startswith("Headline: no figures") and f"report: {tmp_path / 'out' / 'report.md'}" in out
    progress = [line.split("] ", 1)[1] for line in err.splitlines()]
    assert progress[0] == f"      quick run; everything but this progress goes to {log}"
    assert progress[1] == f"1/1 report: results.json, report.md and the plots in {tmp_path / 'out'}"
    assert progress[2].startswith("1/1 report: done in ") and progress[2].endswith("results.json, report.md")
    assert log.is_file()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["quick"] is True
