"""Training throughput: plain PyTorch against Ray Train (1 and 2 workers), and Ray Tune's trial rate.

    .venv/bin/python -m benchmarks.training [--quick] [--untuned] [--out results.json]

Every variant trains the same model (`Architecture` of jobs/configs/adult.yaml), on the same rows,
for the same epochs and per-worker batch size, through the project's own code:

* plain: one process, no Ray. `jobs.train_worker.EpochLoop` (the epoch step of the Ray Train loop:
  `_run_epoch`, AdamW, the LR schedule, early-stopping bookkeeping) driven directly on
  `TensorShard`s of the preprocessed frames, the in-memory tensors a plain PyTorch job would use.
* ray_train_1 / ray_train_2: `jobs.train.fit` (TorchTrainer running `train_loop_per_worker`, with
  its per-epoch checkpoint and report) on `jobs.train.training_data`, 1 or 2 workers.
* tune: `jobs.tune`'s Tuner (`run_trial`: one TorchTrainer per trial, ASHA) on the tune config,
  made small (`tune_config`); trials per minute = completed trials / minutes of `Tuner.fit`.
* with --untuned, ray_train_N_untuned: Ray Train as jobs.train ran before this benchmark (shards
  streamed from Ray Data every epoch, DDP broadcasting buffers every step, the controller polling
  every 2 s), for before/after figures (`training_code`).

Fairness choices:

* Per-epoch MLflow logging is off for the training variants (`run_id=None`, the loop's own switch),
  so none of them pays it. Tune trials do log (their child runs are part of `run_trial`), to a
  throwaway SQLite store in a temporary directory, which also holds Ray Train's checkpoints.
* Early stopping is off (patience = epochs): every variant runs exactly the epochs asked for.
* Torch threads: a Ray worker gets `train.cpus_per_worker` (1); plain PyTorch gets as many, which
  is also faster on this model than torch's default of one per core.
* Loading and preprocessing the data, and importing torch/ray/mlflow in this process, happen once
  before any clock starts. A variant's clock starts with turning the preprocessed frames into its
  input (tensors, the object store or Ray Datasets) and stops with the best weights in the driver.
* Ray start-up: `startup_s` is `ray.init` of a fresh local cluster, `fit_s` is the job on the
  running cluster (worker start-up included), `wall_s` = both. Full mode starts a fresh Ray for
  every job; quick mode shares one (same `startup_s` everywhere) to stay short.
* Throughput: `steady_rows_per_s` is training rows per second of the training pass as the loop
  times it (`train_rows_per_s`), median of epochs 2..N; `steady_rows_per_s_incl_report` divides
  the rows by the median time from one epoch's end to the next (validation, report, checkpoint),
  which is what the job's wall time is made of.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
import typer
from mlflow.tracking import MlflowClient

import jobs.train
from benchmarks.training_recorder import EpochRecorder
from cluster.sandbox import free_port
from core.settings import REPO_ROOT, Settings
from jobs.config import JobConfig, load_config
from jobs.data.loading import Splits, load_splits
from jobs.predictor import Architecture
from jobs.preprocess import Preprocessor
from jobs.schema import build_schema
from jobs.train import fit, loop_config, ray_datasets, training_data
from jobs.train_worker import EpochLoop, TensorShard

TRAIN_CONFIG = REPO_ROOT / "jobs" / "configs" / "adult.yaml"
TUNE_CONFIG = REPO_ROOT / "jobs" / "configs" / "adult-tune.yaml"
# The targets for Ray Train against plain PyTorch on a 2-core machine.
THROUGHPUT_GOAL = 0.9
WALL_GOAL = 1.3
# Quick mode: a multiple of 2 workers x 256 rows, so that every variant trains on every row.
QUICK_TRAIN_ROWS = 8192
QUICK_VAL_ROWS = 2048
RAY_DEFAULT_POLL_INTERVAL_S = "2.0"  # Ray Train's own default, for the untuned variants


@dataclass(frozen=True)
class Plan:
    epochs: int | None  # None: the config's own
    train_rows: int | None  # None: the whole training split
    val_rows: int | None
    tune_trials: int
    tune_epochs: int
    shared_ray: bool  # one Ray for all Ray jobs instead of a fresh one each


FULL = Plan(epochs=None, train_rows=None, val_rows=None, tune_trials=6, tune_epochs=3, shared_ray=False)
QUICK = Plan(
    epochs=2, train_rows=QUICK_TRAIN_ROWS, val_rows=QUICK_VAL_ROWS, tune_trials=2, tune_epochs=1, shared_ray=True
)


# Inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    config: JobConfig
    splits: Splits
    pre: Preprocessor


def _without_early_stopping(config: JobConfig, epochs: int | None) -> JobConfig:
    epochs = epochs or config.train.epochs
    return config.with_overrides({"train.epochs": epochs, "train.patience": epochs})


def load_inputs(plan: Plan) -> Inputs:
    config = _without_early_stopping(load_config(TRAIN_CONFIG), plan.epochs)
    splits = load_splits(config)
    # Fitted on the whole training split whatever the subset: the model's shape stays the config's.
    pre = Preprocessor.fit(splits.train, build_schema(splits.train, config))
    train = splits.train if plan.train_rows is None else splits.train.head(plan.train_rows)
    val = splits.val if plan.val_rows is None else splits.val.head(plan.val_rows)
    return Inputs(config, Splits(train=train, val=val, test=splits.test), pre)


def bench_settings(directory: Path) -> Settings:
    """Checkpoints, Tune results and MLflow runs all go to a throwaway directory."""
    return Settings(
        state_dir=directory,
        ray={"storage_path": str(directory / "ray_results")},
        mlflow={"tracking_uri": f"sqlite:///{directory / 'mlflow.db'}"},
    )


# Plain PyTorch -------------------------------------------------------------------------------


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """As many intra-op threads as a Ray Train worker gets (`cpus_per_worker`): on this small model
    one thread beats two on two cores, so the baseline is the faster of torch's settings."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_plain(inputs: Inputs, settings: Settings) -> dict[str, Any]:
    """The training loop's epoch step in this process, no Ray: the baseline."""
    load = os.getloadavg()[0]
    started = time.perf_counter()
    cfg = {**loop_config(inputs.config, settings, inputs.pre, None), "device": torch.device("cpu")}
    seed = inputs.config.train.seed
    train = TensorShard.from_frame(inputs.pre.to_columns(inputs.splits.train), seed)
    val = TensorShard.from_frame(inputs.pre.to_columns(inputs.splits.val), seed)
    torch.manual_seed(seed)
    loop = EpochLoop.create(Architecture.model_validate(cfg["architecture"]).build(), cfg)
    epochs: list[dict[str, float]] = []
    with torch_threads(cfg["torch_threads"]):
        for epoch in range(cfg["epochs"]):
            metrics, rows = loop.run_epoch(epoch, train, val)
            epochs.append({**metrics, "train_rows": float(rows), "workers": 1.0, "reported_at": time.time()})
    wall = time.perf_counter() - started
    return {
        **summarise(epochs),
        "torch_threads": cfg["torch_threads"],
        "wall_s": wall,
        "fit_s": wall,
        "load_avg_1m": [load, os.getloadavg()[0]],
    }


# Ray Train -----------------------------------------------------------------------------------


@contextmanager
def local_ray(settings: Settings) -> Iterator[float]:
    """A fresh single-node Ray for this process, on a free GCS port (never Redis's 6379); yields
    how long `ray.init` took.

    address="local" ignores RAY_ADDRESS and any running cluster. Token auth follows
    RAY_AUTH_MODE/RAY_AUTH_TOKEN when the environment sets them. Without the dashboard, Ray Train's
    placement-group cleaner (which asks the dashboard's State API) gives up with a logged error:
    it only matters for runs whose controller dies, and no run here is stopped from outside.
    """
    port = free_port()
    temp_dir = f"/tmp/rtt{port}"  # Ray's unix socket paths must stay short
    started = time.perf_counter()
    with environment({"RAY_GCS_SERVER_PORT": str(port)}):  # read once, when Ray starts its GCS
        ray.init(
            address="local",
            num_cpus=settings.ray.num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
    try:
        yield time.perf_counter() - started
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


@contextmanager
def environment(values: dict[str, str | None]) -> Iterator[None]:
    """Set (or, with None, unset) environment variables for the duration."""
    before = {name: os.environ.get(name) for name in values}

    def apply(settings: dict[str, str | None]) -> None:
        for name, value in settings.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    apply(values)
    try:
        yield
    finally:
        apply(before)


@contextmanager
def training_code(tuned: bool) -> Iterator[None]:
    """Untuned: what jobs.train did before this benchmark, for side-by-side figures: workers
    stream their shards from Ray Data every epoch, DDP broadcasts buffers before every step and
    Ray Train's controller polls at its default 2 s."""
    if tuned:
        yield
        return
    limit, broadcast = jobs.train.SHARD_CACHE_MAX_BYTES, jobs.train.DDP_BROADCAST_BUFFERS
    # Both read by `fit`, in the driver.
    jobs.train.SHARD_CACHE_MAX_BYTES, jobs.train.DDP_BROADCAST_BUFFERS = -1, True
    try:
        with environment({jobs.train.POLL_INTERVAL_ENV: RAY_DEFAULT_POLL_INTERVAL_S}):
            yield
    finally:
        jobs.train.SHARD_CACHE_MAX_BYTES, jobs.train.DDP_BROADCAST_BUFFERS = limit, broadcast


def run_ray_train(
    inputs: Inputs, settings: Settings, workers: int, startup_s: float, tuned: bool = True
) -> dict[str, Any]:
    """`fit` on a running cluster; the job's wall time adds the `ray.init` (`startup_s`) just before."""
    config = inputs.config.with_overrides({"train.num_workers": workers})
    log = Path(tempfile.mkdtemp(dir=settings.state_dir)) / "epochs.jsonl"
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with training_code(tuned):
        datasets = training_data(inputs.pre, inputs.splits)
        epochs_run = fit(config, settings, inputs.pre, datasets, None, [EpochRecorder(log)], log.parent.name).epochs_run
    fit_s = time.perf_counter() - started
    epochs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
    if len(epochs) != epochs_run:
        raise RuntimeError(f"recorded {len(epochs)} epochs, fit ran {epochs_run}")
    return {
        **summarise(epochs),
        "torch_threads": int(config.train.cpus_per_worker),
        "wall_s": startup_s + fit_s,
        "startup_s": startup_s,
        "fit_s": fit_s,
        "wall_includes_ray_startup": True,
        "tuned_training_code": tuned,
        # The machine's 1-minute load average before and after: other work on it skews figures.
        "load_avg_1m": [load, os.getloadavg()[0]],
    }


# Ray Tune ------------------------------------------------------------------------------------


def tune_config(plan: Plan) -> JobConfig:
    """The project's search, made small: fewer trials, each as long as ASHA's first rung."""
    config = load_config(TUNE_CONFIG)
    return config.with_overrides(
        {
            "train.epochs": plan.tune_epochs,
            "train.patience": plan.tune_epochs,
            "tune.num_samples": plan.tune_trials,
            "tune.grace_period": plan.tune_epochs,
        }
    )


def run_tune(inputs: Inputs, settings: Settings, plan: Plan) -> dict[str, Any]:
    """Trials per minute of `jobs.tune`'s Tuner on a running cluster (what `tuner.fit` takes)."""
    from jobs.tune import TrialContext, trial_results, tuner

    config = tune_config(plan)
    client = MlflowClient(settings.mlflow.tracking_uri)
    experiment = client.create_experiment("bench-tune", artifact_location=(settings.state_dir / "mlartifacts").as_uri())
    parent = client.create_run(experiment, run_name="bench-tune").info.run_id
    schema = inputs.pre.schema.model_dump_json()
    context = TrialContext(config, settings, inputs.pre, schema, experiment, parent, {}, f"bench-tune-{parent[:8]}")
    datasets = ray_datasets(inputs.pre, inputs.splits)
    started = time.perf_counter()
    results = trial_results(tuner(context, datasets).fit())
    wall = time.perf_counter() - started
    completed = [r for r in results if r.error is None and (r.metrics or {}).get("training_iteration")]
    tc = config.tune
    assert tc is not None  # tune_config always has one
    return {
        "trials": len(completed),
        "trials_started": len(results),
        "epochs_per_trial": plan.tune_epochs,
        "max_concurrent_trials": tc.max_concurrent_trials,
        "workers_per_trial": tc.trial_workers,
        "wall_s": wall,
        "wall_includes_ray_startup": False,
        "trials_per_min": len(completed) / (wall / 60),
    }


# Figures -------------------------------------------------------------------------------------


def _steady(values: list[float]) -> float:
    """Median without the first value (warm-up) unless it is the only one."""
    return statistics.median(values[1:] or values)


def summarise(epochs: list[dict[str, float]]) -> dict[str, Any]:
    """Per-epoch curves and steady-state figures of one run.

    `steady_rows_per_s` is the training pass alone, as the loop times it. The epoch period runs
    from one epoch's end to the next's: training, validation and, under Ray, the report and
    checkpoint, i.e. what the job's wall time is made of.
    """
    rates = [e["train_rows_per_s"] for e in epochs]
    rows = [int(e["train_rows"]) for e in epochs]
    ends = [e["reported_at"] for e in epochs]
    periods = [b - a for a, b in itertools.pairwise(ends)]
    period = statistics.median(periods) if periods else epochs[0]["epoch_time_s"]
    return {
        "epochs": len(epochs),
        "workers": int(epochs[0]["workers"]),
        "rows_per_epoch": rows[0],
        "epoch_rows": rows,
        "epoch_rows_per_s": rates,
        "steady_rows_per_s": _steady(rates),
        "epoch_s": [e["epoch_time_s"] for e in epochs],
        "epoch_period_s": periods,
        "steady_epoch_period_s": period,
        "steady_rows_per_s_incl_report": rows[-1] / period,
        "train_loss": [e["train_loss"] for e in epochs],
        "val_loss": [e["val_loss"] for e in epochs],
        "val_accuracy": [e.get("val_accuracy", math.nan) for e in epochs],
    }


def epochs_for_wall_goal(plain: dict[str, Any], ray_run: dict[str, Any]) -> int | None:
    """Fewest epochs for which wall(Ray) <= WALL_GOAL x wall(plain), extrapolated from each run's
    fixed cost and steady epoch period; None when Ray's epochs are too slow for it ever to hold."""

    def fixed_and_period(run_: dict[str, Any]) -> tuple[float, float]:
        period = run_["steady_epoch_period_s"]
        return run_["wall_s"] - period * run_["epochs"], period

    plain_fixed, plain_period = fixed_and_period(plain)
    ray_fixed, ray_period = fixed_and_period(ray_run)
    margin = WALL_GOAL * plain_period - ray_period
    if margin <= 0:
        return None
    return max(1, math.ceil((ray_fixed - WALL_GOAL * plain_fixed) / margin))


def ratios(plain: dict[str, Any], ray_run: dict[str, Any]) -> dict[str, Any]:
    throughput = ray_run["steady_rows_per_s"] / plain["steady_rows_per_s"]
    wall = ray_run["wall_s"] / plain["wall_s"]
    return {
        "steady_throughput": throughput,
        "steady_throughput_incl_report": ray_run["steady_rows_per_s_incl_report"]
        / plain["steady_rows_per_s_incl_report"],
        "wall": wall,
        "fit_wall": ray_run["fit_s"] / plain["wall_s"],
        "meets_throughput_goal": throughput >= THROUGHPUT_GOAL,
        "meets_wall_goal": wall <= WALL_GOAL,
        "epochs_for_wall_goal": epochs_for_wall_goal(plain, ray_run),
    }


def run_ray(inputs: Inputs, settings: Settings, plan: Plan, untuned: bool) -> dict[str, Any]:
    """The Ray Train variants, then Tune. In full mode each starts its own Ray, so that every job's
    wall time includes a cold start; quick mode shares one cluster to stay short."""
    jobs_ = [("ray_train_1", 1, True), ("ray_train_2", 2, True)]
    if untuned:
        jobs_ += [("ray_train_1_untuned", 1, False), ("ray_train_2_untuned", 2, False)]
    results: dict[str, Any] = {}
    with ExitStack() as shared:
        startup = shared.enter_context(local_ray(settings)) if plan.shared_ray else 0.0
        for name, workers, tuned in jobs_:
            with ExitStack() as own:
                if not plan.shared_ray:
                    startup = own.enter_context(local_ray(settings))
                results[name] = {
                    **run_ray_train(inputs, settings, workers, startup, tuned),
                    "fresh_ray": not plan.shared_ray,
                }
        with ExitStack() as own:
            if not plan.shared_ray:
                own.enter_context(local_ray(settings))
            results["tune"] = run_tune(inputs, settings, plan)
    return results


def run(quick: bool = False, untuned: bool = False) -> dict[str, Any]:
    """Every variant in turn; a JSON-serialisable summary (see the module docstring). `untuned`
    adds the Ray Train variants as jobs.train ran them before this benchmark (`*_untuned`)."""
    plan = QUICK if quick else FULL
    inputs = load_inputs(plan)
    with tempfile.TemporaryDirectory(prefix="bench-training-") as tmp:
        settings = bench_settings(Path(tmp))
        plain = run_plain(inputs, settings)
        ray_results = run_ray(inputs, settings, plan, untuned)
    tune = ray_results.pop("tune")
    return {
        "quick": quick,
        "config": str(TRAIN_CONFIG.relative_to(REPO_ROOT)),
        "batch_size": inputs.config.train.batch_size,
        "train_rows": len(inputs.splits.train),
        "val_rows": len(inputs.splits.val),
        "cpus": os.cpu_count(),
        "plain": plain,
        **ray_results,
        "ratios": {name: ratios(plain, v) for name, v in ray_results.items()},
        "goals": {"steady_throughput": THROUGHPUT_GOAL, "wall": WALL_GOAL},
        "tune": tune,
    }


def table(result: dict[str, Any]) -> str:
    header = (
        f"{'variant':<20} {'wk':>2} {'ep':>3} {'rows/ep':>7} {'train rows/s':>12} {'incl report':>11} "
        f"{'x thr':>5} {'startup s':>9} {'fit s':>6} {'wall s':>6} {'x wall':>6} {'ep->1.3x':>8} {'load':>9}"
    )
    lines = [header]
    for name, run_ in result.items():
        if not isinstance(run_, dict) or "steady_rows_per_s" not in run_:
            continue
        ratio = result["ratios"].get(name, {"steady_throughput": 1.0, "wall": 1.0, "epochs_for_wall_goal": "-"})
        lines.append(
            f"{name:<20} {run_['workers']:>2} {run_['epochs']:>3} {run_['rows_per_epoch']:>7} "
            f"{run_['steady_rows_per_s']:>12.0f} {run_['steady_rows_per_s_incl_report']:>11.0f} "
            f"{ratio['steady_throughput']:>5.2f} {run_.get('startup_s', 0.0):>9.2f} {run_['fit_s']:>6.2f} "
            f"{run_['wall_s']:>6.2f} {ratio['wall']:>6.2f} {ratio['epochs_for_wall_goal'] or 'never':>8} "
            f"{'{:.1f}-{:.1f}'.format(*run_['load_avg_1m']):>9}"
        )
    tune = result["tune"]
    lines.append(
        f"tune: {tune['trials']}/{tune['trials_started']} trials of {tune['epochs_per_trial']} epoch(s), "
        f"{tune['max_concurrent_trials']} at a time, in {tune['wall_s']:.1f} s = {tune['trials_per_min']:.1f} "
        "trials/min (cluster already running)"
    )
    return "\n".join(lines)


def main(
    quick: bool = typer.Option(False, "--quick", help="2 epochs on a subset, 2 one-epoch trials"),
    untuned: bool = typer.Option(False, "--untuned", help="also run Ray Train as jobs.train was before tuning"),
    out: Path | None = typer.Option(None, "--out", help="also write the JSON result here"),
) -> None:
    result = run(quick=quick, untuned=untuned)
    typer.echo(table(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    typer.run(main)
