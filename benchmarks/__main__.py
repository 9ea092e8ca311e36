"""`make bench`: the platform against its peers, on this machine, in one run.

    .venv/bin/python -m benchmarks [--quick] [--out benchmarks/results] [--skip training] [--log FILE]

Starts a stack of its own (`cluster/sandbox.py`), measures the retraining loop (whose model then
serves), the serving paths against `mlflow models serve`, a bare FastAPI server and the
in-process call, profiles the ingress replica, measures two models served at once against one
(benchmarks/multi_model.py) and the shapes Serve offers for many models
(benchmarks/serving_shapes.py), stops the stack, then measures training (Ray Train
with 1 and 2 workers against a plain PyTorch loop, and Ray Tune) on a quiet machine, batch
inference with Ray Data against the model in-process on one core (benchmarks/batch_predict.py), the
drift monitor's cost and time to alert (benchmarks/monitor_overhead.py), and what a shadow
challenger costs the clients (benchmarks/shadow_overhead.py). Writes results.json, report.md and
PNG plots to --out.

The terminal (stderr) shows one line per phase as it starts and as it ends, with the elapsed
time and the phase that comes next, and a heartbeat while a phase runs; at the end the headline
table (stdout). Everything else (the sections' own lines, Ray, wrk, the peers) goes to --log.

A new section is a `Phase` in `PHASES`: a function of the `Run` returning its results under
their key in results.json (benchmarks/report.py renders it; see its `SECTIONS`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from benchmarks.report import headline_text, machine_info, write_report
from cluster.sandbox import Stack
from core.progress import Progress, duration, output_to_log
from core.settings import REPO_ROOT, get_settings

# A "still running" line this often while a phase runs: several phases take minutes.
HEARTBEAT_S = 60.0
# Steps of the run besides the phases.
STACK_UP, STACK_DOWN, REPORT = "stack up", "stack down", "report"


@dataclass
class Run:
    """What the phases share: the options, the results so far, and the stack while it runs."""

    quick: bool
    out: Path
    results: dict[str, Any] = field(default_factory=dict)
    stack: Stack | None = None
    client: httpx.Client | None = None  # the inference API through Nginx, with the stack's key

    def on_stack(self) -> tuple[Stack, httpx.Client]:
        assert self.stack is not None and self.client is not None, "a stack phase runs while the stack is up"
        return self.stack, self.client


Measure = Callable[[Run], dict[str, Any]]


@dataclass(frozen=True)
class Phase:
    name: str  # its key in results.json, and what --skip takes
    what: str  # what the progress line says it does
    measure: Measure  # returns {results.json key: figures}
    on_stack: bool = False  # runs on the shared stack (`stack up` before the first, `stack down` after the last)


# Phases ----------------------------------------------------------------------------------------


def _loop(run: Run) -> dict[str, Any]:
    from benchmarks.loop import retrain_loop

    _, client = run.on_stack()
    # The loop's training job also gives the stack its champion, which the serving phases use.
    return {"loop": retrain_loop(client, {"train.epochs": 1} if run.quick else {})}


def _serving(run: Run) -> dict[str, Any]:
    from benchmarks.multi_model import run_multi_model
    from benchmarks.serving import Plan, run_serving

    stack, _ = run.on_stack()
    version = str(run.results["loop"]["version_after"])
    uri = f"models:/{stack.settings.model.name}/{version}"
    plan = Plan.quick() if run.quick else Plan()
    serving = run_serving(stack.settings, stack.api_key, uri, plan, run.out / "serving", stack.ca_file)
    profile = serving.pop("profile")
    # Two models served at once against one: 16 connections split evenly (4 when quick).
    serving["multi_model"] = run_multi_model(
        stack.settings,
        stack.api_key,
        stack.ca_file,
        stack.settings.model.name,
        version,
        connections=4 if run.quick else 16,
        duration_s=plan.duration_s,
    )
    return {"serving": serving, "profile": profile}


def _shapes(run: Run) -> dict[str, Any]:
    from benchmarks.serving_shapes import run_shapes

    stack, _ = run.on_stack()
    # Fleet, one application per model and @serve.multiplexed, side by side (ADR 12).
    shapes = run_shapes(
        stack.settings,
        stack.api_key,
        stack.settings.model.name,
        str(run.results["loop"]["version_after"]),
        connections=4 if run.quick else 16,
        duration_s=2 if run.quick else 15,
    )
    return {"shapes": shapes}


def _training(run: Run) -> dict[str, Any]:
    from benchmarks.training import run as run_training

    return {"training": run_training(quick=run.quick)}


# Rows the batch inference phase generates and scores, and of those scored in-process on one core.
BATCH_ROWS, BATCH_BASELINE_ROWS = 5_000_000, 1_000_000
QUICK_BATCH_ROWS, QUICK_BATCH_BASELINE_ROWS = 100_000, 50_000


def _batch_predict(run: Run) -> dict[str, Any]:
    from benchmarks.batch_predict import batch_inference

    # A Ray of its own, its object store capped far below the data in memory: the job streams or
    # fails (benchmarks/batch_predict.py). A quick run's data fits in the store: it checks the path.
    rows, baseline = (QUICK_BATCH_ROWS, QUICK_BATCH_BASELINE_ROWS) if run.quick else (BATCH_ROWS, BATCH_BASELINE_ROWS)
    return {"batch_predict": batch_inference(rows, baseline_rows=baseline)}


def _monitor(run: Run) -> dict[str, Any]:
    from benchmarks.monitor_overhead import run as run_monitor

    # Stacks of its own, restarted with the drift monitor off and on (benchmarks/monitor_overhead.py).
    return {"monitor": run_monitor(duration=5 if run.quick else 20, rounds=1 if run.quick else 3)}


def _training_job(run: Run) -> dict[str, Any]:
    from benchmarks.training_job import run as run_training_job

    # A stack of its own: the whole default job through the Jobs API against a plain one.
    return {"training_job": run_training_job(rounds=1 if run.quick else 2)}


def _shadow(run: Run) -> dict[str, Any]:
    from benchmarks.shadow_overhead import run as run_shadow

    # A stack of its own, with a shadow challenger loaded and not, alternating.
    return {"shadow": run_shadow(duration=5 if run.quick else 20, rounds=1 if run.quick else 3)}


# In the order they run. The stack phases first, on one shared stack; the others each on a quiet
# machine (stacks of their own, or none). New sections go here.
PHASES: tuple[Phase, ...] = (
    Phase("loop", "POST /v1/training-jobs until the new champion serves", _loop, on_stack=True),
    Phase(
        "serving",
        "the platform, mlflow and bare FastAPI under wrk; bulk request forms; the in-process ceiling; the profile; "
        "two models at once",
        _serving,
        on_stack=True,
    ),
    Phase("shapes", "the shapes Serve offers for many models", _shapes, on_stack=True),
    Phase("training", "plain PyTorch against Ray Train with 1 and 2 workers, and Ray Tune", _training),
    Phase(
        "training_job", "a whole training job against a plain PyTorch job, by phase (a stack of its own)", _training_job
    ),
    Phase(
        "batch_predict",
        "batch inference with Ray Data against the model in-process on one core (a Ray of its own)",
        _batch_predict,
    ),
    Phase("monitor", "the drift monitor's cost and time to alert (stacks of its own)", _monitor),
    Phase("shadow", "a shadow challenger's cost to the clients (a stack of its own)", _shadow),
)
SECTIONS = tuple(phase.name for phase in PHASES)
# The loop trains the model that the other stack phases serve.
NEEDS_LOOP = {phase.name for phase in PHASES if phase.on_stack} - {"loop"}


def selected(skip: set[str]) -> list[Phase]:
    unknown = skip - set(SECTIONS)
    if unknown:
        raise typer.BadParameter(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    wanted = set(SECTIONS) - skip
    if wanted & NEEDS_LOOP:
        wanted.add("loop")
    return [phase for phase in PHASES if phase.name in wanted]


def steps(phases: list[Phase]) -> list[str]:
    """The progress plan: the stack's start and stop around the stack phases, the report last."""
    names: list[str] = []
    stack_phases = [phase.name for phase in phases if phase.on_stack]
    for phase in phases:
        if stack_phases and phase.name == stack_phases[0]:
            names.append(STACK_UP)
        names.append(phase.name)
        if stack_phases and phase.name == stack_phases[-1]:
            names.append(STACK_DOWN)
    return [*names, REPORT]


@contextlib.contextmanager
def _shared_stack(run: Run, progress: Progress, log_file: Path | None) -> Iterator[None]:
    from cluster.sandbox import hermetic_stack

    with contextlib.ExitStack() as held:
        what = "a stack of its own: `cluster up` on free ports, its own database and queues"
        with progress.step(STACK_UP, what, log=log_file):
            run.stack = held.enter_context(hermetic_stack("bench"))
            run.client = held.enter_context(run.stack.client())
        yield
        with progress.step(STACK_DOWN, "stopping the stack and removing its database and queues", log=log_file):
            held.close()
            run.stack = run.client = None


def run_phases(run: Run, phases: list[Phase], progress: Progress, log_file: Path | None = None) -> None:
    """Each phase in turn as a step of `progress`; a failing one ends the run (its step says why,
    and where `log_file` is), after the shared stack is stopped."""
    with contextlib.ExitStack() as scope:
        for phase in phases:
            if phase.on_stack and run.stack is None:
                scope.enter_context(_shared_stack(run, progress, log_file))
            with progress.step(phase.name, phase.what, log=log_file) as step:
                figures = phase.measure(run)
                run.results.update(figures)
                step.outcome = f"results: {', '.join(figures)}"
            if phase.on_stack and not any(p.on_stack for p in phases[phases.index(phase) + 1 :]):
                scope.close()


app = typer.Typer(add_completion=False)


@app.command()
def main(
    quick: Annotated[bool, typer.Option(help="seconds per measurement instead of minutes (smoke run)")] = False,
    out: Annotated[Path, typer.Option(help="where results.json, report.md and the plots go")] = REPO_ROOT
    / "benchmarks"
    / "results",
    skip: Annotated[list[str] | None, typer.Option(help=f"leave out a section: {', '.join(SECTIONS)}")] = None,
    log: Annotated[
        Path | None, typer.Option(help="where everything but the progress goes (default: the state dir's logs)")
    ] = None,
) -> None:
    phases = selected(set(skip or []))
    log_file = log or get_settings().logs_dir / "bench.log"
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    run = Run(quick=quick, out=out, results={"machine": machine_info(), "quick": quick})
    with output_to_log(log_file) as terminal:
        progress = Progress(steps(phases), out=terminal.err, heartbeat_s=HEARTBEAT_S)
        progress.note(f"{'quick' if quick else 'full'} run; everything but this progress goes to {log_file}")
        run_phases(run, phases, progress, log_file)
        run.results["duration_s"] = time.monotonic() - started
        with progress.step(REPORT, f"results.json, report.md and the plots in {out}", log=log_file) as step:
            written = write_report(run.results, out)
            step.outcome = ", ".join(path.name for path in written.values())
    typer.echo(headline_text(run.results))
    typer.echo(f"\nreport: {written['report']}   (took {duration(time.monotonic() - started)}; log: {log_file})")


if __name__ == "__main__":
    app()
