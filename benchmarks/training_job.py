"""A whole training job against a plain PyTorch job doing the same work, and where the job's time
goes.

    .venv/bin/python -m benchmarks.training_job [--rounds 2] [--out FILE]

On a hermetic stack (`cluster up`: Ray head, MLflow server on PostgreSQL, ...), alternating:

* job: `jobs.train` on the default Adult config, submitted through the Ray Jobs API as `ray job
  submit` does (working dir shipped), clocked from the submission until the Jobs API says
  SUCCEEDED: registered and gated. The status is asked for every `STATUS_POLL_S`; following the
  job's log stream instead (`follow_job`) would add the server's log-tail pauses (a second, twice,
  after the job ended) to every job. Its phases come from its result line (jobs/phases.py);
  `submit_and_exit` is the rest: packaging and uploading the working dir, starting the driver
  process, and the driver's exit until the Jobs API reports it.
* plain: this process, no Ray: the same data load and preprocessing, as many epochs as the job
  ran (`EpochLoop` on in-memory tensors, the per-worker batch size, as many torch threads as the
  job's workers have CPUs together), calibration, evaluation, and registration to the same MLflow
  server under a model name of its own (nothing to gate against). Its imports are done before the
  clock starts: a fresh process would pay them too, which makes the ratio slightly kinder to
  the plain job than to Ray.
* floor: `benchmarks.train_floor` submitted and clocked as the job is: the driver's imports,
  connecting to Ray and the same Ray Train worker group, which reports once and stops. No change to
  what the job itself does can take its ratio below this one's.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import mlflow
import torch
import typer
from mlflow.tracking import MlflowClient

from cluster.sandbox import Stack, hermetic_stack
from core.settings import REPO_ROOT, Settings
from jobs.config import JobConfig, load_config
from jobs.data.loading import load_splits
from jobs.evaluate import evaluate
from jobs.finish import calibrate_and_profile
from jobs.phases import Phases
from jobs.predictor import Architecture, TabularPredictor
from jobs.preprocess import Preprocessor
from jobs.registry import log_and_register
from jobs.result import training_result
from jobs.schema import build_schema
from jobs.train import architecture_for, loop_config
from jobs.train_worker import EpochLoop, TensorShard
from services.ray_submission import jobs_client, submit_training

CONFIG = "jobs/configs/adult.yaml"
# The goal: the whole job within this multiple of the plain job's wall time.
WALL_GOAL = 2.0
STATUS_POLL_S = 0.1


def _submitted(stack: Stack, module: str) -> tuple[float, str]:
    """Submit `module` with the default config as a training job is submitted; its wall time from
    the submission until the Jobs API says SUCCEEDED, and its logs."""
    started = time.perf_counter()
    job_id = submit_training(
        stack.settings, CONFIG, module=module, env={"MLFLOW_EXPERIMENT": stack.settings.mlflow.experiment}
    )
    client = jobs_client(stack.settings)
    while not (state := client.get_job_status(job_id)).is_terminal():
        time.sleep(STATUS_POLL_S)
    wall = time.perf_counter() - started
    logs = client.get_job_logs(job_id)
    if state.value != "SUCCEEDED":
        raise RuntimeError(f"job {job_id} ({module}) ended {state.value}: {logs[-2000:]}")
    return wall, logs


def ray_job(stack: Stack) -> dict[str, Any]:
    """One default training job through the Jobs API, from submission to SUCCEEDED."""
    wall, logs = _submitted(stack, "jobs.train")
    result = training_result(logs)
    if result is None:
        raise RuntimeError(f"training job printed no result line: {logs[-2000:]}")
    phases: dict[str, float] = result.get("phases") or {}
    return {
        "wall_s": wall,
        "epochs_run": result["epochs_run"],
        "model_version": result["model_version"],
        "test_metrics": result["test_metrics"],
        "phases": {**phases, "submit_and_exit": max(0.0, wall - sum(phases.values()))},
    }


def floor_job(stack: Stack) -> dict[str, Any]:
    """`benchmarks.train_floor` through the Jobs API: what a job pays before it trains anything."""
    wall, _ = _submitted(stack, "benchmarks.train_floor")
    return {"wall_s": wall, "phases": {}}


def plain_job(config: JobConfig, settings: Settings, epochs: int) -> dict[str, Any]:
    """The same work in this process without Ray; see the module's docstring."""
    phases = Phases()
    started = time.perf_counter()
    config = config.with_overrides({"train.epochs": epochs, "train.patience": epochs})
    with phases.timed("data_load"):
        splits = load_splits(config, settings)
    with phases.timed("preprocess"):
        pre = Preprocessor.fit(splits.train, build_schema(splits.train, config))
    with phases.timed("fit"):
        best = _plain_fit(config, settings, pre, splits.train, splits.val)
    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    mlflow.set_experiment(settings.mlflow.experiment)
    client = MlflowClient(settings.mlflow.tracking_uri)
    with mlflow.start_run(run_name="plain-bench"):
        with phases.timed("calibrate_profile"):
            predictor = TabularPredictor.from_state_dict(pre, architecture_for(pre, config), best)
            mlflow.log_metrics(calibrate_and_profile(predictor, splits.train, splits.val))
        with phases.timed("evaluate"):
            test_metrics = evaluate(predictor, splits.test)
            mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items()})
        with phases.timed("register"):
            version = log_and_register(predictor, splits.test, f"{config.registered_model_name}-plain", client, None)
    return {
        "wall_s": time.perf_counter() - started,
        "epochs_run": epochs,
        "model_version": version.version,
        "test_metrics": test_metrics,
        "phases": phases.rounded(),
    }


def _plain_fit(config: JobConfig, settings: Settings, pre: Preprocessor, train: Any, val: Any) -> dict[str, Any]:
    cfg = {**loop_config(config, settings, pre, None), "device": torch.device("cpu")}
    seed = config.train.seed
    torch.manual_seed(seed)
    loop = EpochLoop.create(Architecture.model_validate(cfg["architecture"]).build(), cfg)
    train_shard = TensorShard.from_frame(pre.to_columns(train), seed)
    val_shard = TensorShard.from_frame(pre.to_columns(val), seed)
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.train.num_workers * config.train.cpus_per_worker)))
    try:
        for epoch in range(config.train.epochs):
            loop.run_epoch(epoch, train_shard, val_shard)
    finally:
        torch.set_num_threads(before)
    return loop.best_state


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    jobs = [r for r in runs if r["variant"] == "job"]
    plains = [r for r in runs if r["variant"] == "plain"]
    floors = [r for r in runs if r["variant"] == "floor"]
    job_wall = statistics.median(r["wall_s"] for r in jobs)
    plain_wall = statistics.median(r["wall_s"] for r in plains)
    floor_wall = statistics.median(r["wall_s"] for r in floors) if floors else None
    return {
        "config": CONFIG,
        "rounds": len(jobs),
        "job_wall_s": job_wall,
        "plain_wall_s": plain_wall,
        "ratio": job_wall / plain_wall,
        "goal": WALL_GOAL,
        # The same submission path and worker group training nothing: the ratio no change to the
        # job's own work can go below.
        "floor_wall_s": floor_wall,
        "floor_ratio": floor_wall / plain_wall if floor_wall is not None else None,
        "job_phases_s": _median_phases(jobs),
        "plain_phases_s": _median_phases(plains),
        "runs": runs,
    }


def _median_phases(runs: list[dict[str, Any]]) -> dict[str, float]:
    names = list(dict.fromkeys(name for r in runs for name in r["phases"]))
    return {name: round(statistics.median(r["phases"].get(name, 0.0) for r in runs), 3) for name in names}


def run(rounds: int = 2) -> dict[str, Any]:
    config = load_config(REPO_ROOT / CONFIG)
    runs: list[dict[str, Any]] = []
    with hermetic_stack("bench_training_job") as stack:
        for round_ in range(rounds):
            job = {"variant": "job", "round": round_, **ray_job(stack)}
            runs.append(job)
            typer.echo(f"job: {job['wall_s']:.1f} s ({job['epochs_run']} epochs)", err=True)
            plain = {"variant": "plain", "round": round_, **plain_job(config, stack.settings, job["epochs_run"])}
            runs.append(plain)
            typer.echo(f"plain: {plain['wall_s']:.1f} s", err=True)
            floor = {"variant": "floor", "round": round_, **floor_job(stack)}
            runs.append(floor)
            typer.echo(f"floor: {floor['wall_s']:.1f} s", err=True)
    return summarise(runs)


def main(
    rounds: int = typer.Option(2, help="job/plain pairs, alternating"),
    out: Path | None = typer.Option(None, help="write the figures here as JSON"),
) -> None:
    """Time a default training job against a plain PyTorch job doing the same work."""
    figures = run(rounds)
    text = json.dumps(figures, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(
        f"job {figures['job_wall_s']:.1f} s, plain {figures['plain_wall_s']:.1f} s: {figures['ratio']:.2f}x"
        f" (goal <= {WALL_GOAL}x); a job training nothing {figures['floor_wall_s']:.1f} s:"
        f" {figures['floor_ratio']:.2f}x"
    )
    for name, seconds in figures["job_phases_s"].items():
        typer.echo(f"  {name:<22} {seconds:8.3f} s")


if __name__ == "__main__":
    typer.run(main)
