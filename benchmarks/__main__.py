"""`make bench`: the platform against its peers, on this machine, in one run.

    .venv/bin/python -m benchmarks [--quick] [--out benchmarks/results] [--skip training]

Starts a stack of its own (`cluster/sandbox.py`), measures the retraining loop (whose model then
serves), the serving paths against `mlflow models serve`, a bare FastAPI server and the
in-process call, profiles the ingress replica, measures two models served at once against one
(benchmarks/multi_model.py) and the shapes Serve offers for many models
(benchmarks/serving_shapes.py), stops the stack, then measures training (Ray Train
with 1 and 2 workers against a plain PyTorch loop, and Ray Tune) on a quiet machine, and the drift
monitor's cost and time to alert (benchmarks/monitor_overhead.py), and what a shadow challenger
costs the clients (benchmarks/shadow_overhead.py). Writes
results.json, report.md and PNG plots to --out.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from benchmarks.loop import retrain_loop
from benchmarks.multi_model import run_multi_model
from benchmarks.report import machine_info, write_report
from benchmarks.serving import Plan, run_serving
from benchmarks.serving_shapes import run_shapes
from cluster.sandbox import hermetic_stack
from core.settings import REPO_ROOT

SECTIONS = ("loop", "serving", "shapes", "training", "monitor", "shadow")
app = typer.Typer(add_completion=False)


def _platform(quick: bool, out: Path, skip: set[str]) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with hermetic_stack("bench") as stack, stack.client() as client:
        # The loop's training job also gives the stack its champion, which the serving part uses.
        overrides = {"train.epochs": 1} if quick else {}
        results["loop"] = retrain_loop(client, overrides)
        if "serving" not in skip:
            uri = f"models:/{stack.settings.model.name}/{results['loop']['version_after']}"
            plan = Plan.quick() if quick else Plan()
            serving = run_serving(stack.settings, stack.api_key, uri, plan, out / "serving", stack.ca_file)
            results["profile"] = serving.pop("profile")
            if stack.ca_file is not None:
                # Two models served at once against one: 16 connections split evenly (4 when quick).
                serving["multi_model"] = run_multi_model(
                    stack.settings,
                    stack.api_key,
                    stack.ca_file,
                    stack.settings.model.name,
                    str(results["loop"]["version_after"]),
                    connections=4 if quick else 16,
                    duration_s=plan.duration_s,
                )
            results["serving"] = serving
        if "shapes" not in skip:
            # Fleet, one application per model and @serve.multiplexed, side by side (ADR 12).
            results["shapes"] = run_shapes(
                stack.settings,
                stack.api_key,
                stack.settings.model.name,
                str(results["loop"]["version_after"]),
                connections=4 if quick else 16,
                duration_s=2 if quick else 15,
            )
    return results


@app.command()
def main(
    quick: Annotated[bool, typer.Option(help="seconds per measurement instead of minutes (smoke run)")] = False,
    out: Annotated[Path, typer.Option(help="where results.json, report.md and the plots go")] = REPO_ROOT
    / "benchmarks"
    / "results",
    skip: Annotated[list[str] | None, typer.Option(help=f"leave out a section: {', '.join(SECTIONS)}")] = None,
) -> None:
    skipped = set(skip or [])
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine_info(), "quick": quick}
    if not {"loop", "serving", "shapes"} <= skipped:
        results.update(_platform(quick, out, skipped))
    if "training" not in skipped:
        from benchmarks.training import run as run_training

        results["training"] = run_training(quick=quick)
    if "monitor" not in skipped:
        from benchmarks.monitor_overhead import run as run_monitor

        # Stacks of its own, restarted with the drift monitor off and on (benchmarks/monitor_overhead.py).
        results["monitor"] = run_monitor(duration=5 if quick else 20, rounds=1 if quick else 3)
    if "shadow" not in skipped:
        from benchmarks.shadow_overhead import run as run_shadow

        # A stack of its own, with a shadow challenger loaded and not, alternating.
        results["shadow"] = run_shadow(duration=5 if quick else 20, rounds=1 if quick else 3)
    results["duration_s"] = time.monotonic() - started
    written = write_report(results, out)
    typer.echo(f"wrote {', '.join(str(p) for p in written.values())} in {results['duration_s']:.0f} s")


if __name__ == "__main__":
    app()
