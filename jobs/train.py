"""Distributed training with Ray Train, tracked in MLflow, registered and gated for promotion.

    python -m jobs.train --config jobs/configs/adult.yaml [--set train.epochs=2]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.train --config jobs/configs/adult.yaml
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
import torch
import typer
from mlflow.data.dataset import Dataset
from mlflow.data.pandas_dataset import from_pandas as mlflow_dataset_from_pandas
from mlflow.entities import Param, RunTag
from mlflow.tracking import MlflowClient

from core.logs import configure_logging
from core.settings import REPO_ROOT, Settings, get_settings
from core.telemetry import current_ids, init_tracing, shutdown_tracing, span_from
from jobs.config import JobConfig, load_config, parse_override
from jobs.data.loading import Splits, combined_digest, load_splits
from jobs.evaluate import evaluate
from jobs.feedback_data import with_feedback
from jobs.finish import calibrate_and_profile
from jobs.phases import Phases, WorkerTimings, fit_phases, since_process_start
from jobs.predictor import Architecture, TabularPredictor
from jobs.preprocess import Preprocessor
from jobs.promote import EXIT_NOT_PROMOTED, Decision, gate
from jobs.registry import log_and_register, log_job_files, requester, requester_tags
from jobs.result import result_line
from jobs.run_store import (
    RunStore,
    RunStoreUnreachableError,
    require_run_store,
    run_store,
    unreachable_message,
    unreachable_reason,
)
from jobs.schema import build_schema, snake_case
from jobs.tracking import bound_request_retries, require_tracking_server
from jobs.train_worker import CHECKPOINT_FILE as CHECKPOINT_FILE  # re-exported: jobs.tune reads it
from jobs.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)
# Workers train from memory (`TensorShard`) when the preprocessed splits together are at most this
# large: `training_data` hands them over as plain columns in the object store, and `cache_shards`
# has workers read Ray Datasets this small once. Larger ones stream from Ray Data every epoch.
SHARD_CACHE_MAX_BYTES = 512 * 1024**2
# Ray Train's controller collects reports by polling its workers, every 2 s by default, and a
# worker's `ray.train.report` blocks until its previous report was collected: epochs shorter than
# the interval each waited for it, most of a short job's wall time (benchmarks/README.md). A poll is
# one small actor call per worker. The environment variable, when set, still decides.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.1"
# Ray Train starts a preemption watcher actor with every worker group, to let the training loop
# see a node's drain coming and checkpoint before it goes. This loop does not look (it checkpoints
# every epoch), and Ray charges a worker lost to a drain to the preemption budget without the
# watcher too: for a standalone run the watcher is one more process to start beside the workers.
# The environment variable, when set, still decides.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"
# DDP broadcasts rank 0's buffers (BatchNorm statistics) before every forward pass by default: one
# more collective per step, which cost more than a small model's step on a small machine
# (benchmarks/README.md). Rank 0's statistics, the ones checkpointed, evolve the same without it;
# the other ranks validate with their own.
DDP_BROADCAST_BUFFERS = False


@dataclass
class TrainingOutcome:
    run_id: str
    model_name: str
    model_version: str
    test_metrics: dict[str, float]
    epochs_run: int
    promotion: Decision | None
    wall_time_s: float
    # Seconds by phase of the job (jobs/phases.py), driver start to the gate's decision.
    phases: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Fitted:
    best_state: dict[str, Any]
    epochs_run: int
    phases: dict[str, float]


# Driver side -------------------------------------------------------------------------------


def cache_shards(datasets: dict[str, Any]) -> bool:
    """Whether workers should hold their shards in memory: only data already materialised in the
    object store (no lazy reads to trigger) and small enough to copy into every worker."""
    from ray.data.dataset import MaterializedDataset

    return all(
        isinstance(ds, MaterializedDataset) and (ds.size_bytes() or math.inf) <= SHARD_CACHE_MAX_BYTES
        for ds in datasets.values()
    )


def git_commit(settings: Settings) -> str:
    if settings.git_commit:
        return settings.git_commit
    for directory in (Path.cwd(), REPO_ROOT):
        try:
            out = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=5, check=True
            )
            return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
    return "unknown"


def provenance_tags(settings: Settings, splits: Splits, digest: str) -> dict[str, str]:
    per_split = {f"data.sha256.{n}": splits.digests[uri] for n, uri in splits.sources.items() if uri in splits.digests}
    context = ray.get_runtime_context()
    ids = current_ids()
    return {
        **({"trace_id": ids[0]} if ids else {}),
        "git_commit": git_commit(settings),
        "data.sha256": digest,
        **per_split,
        "ray.job_id": context.get_job_id(),
        # Ray names the uploaded working dir by its content hash: provenance without .git.
        "ray.working_dir": str(context.runtime_env.get("working_dir", "")),
        **requester_tags(requester(settings.audit_actor)),
    }


def flat_params(config: JobConfig) -> dict[str, Any]:
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}.{key}" if prefix else key, value)
        else:
            flat[prefix] = json.dumps(node) if isinstance(node, list) else node

    walk("", config.model_dump(exclude={"data": {"features"}}))
    return {k: str(v)[:500] for k, v in flat.items()}


def log_inputs(splits: Splits, config: JobConfig, digest: str) -> None:
    """The splits as the run's data set inputs, in one request."""
    names = ["train", "validation", "test"]
    datasets: list[Dataset | None] = [
        mlflow_dataset_from_pandas(
            frame,
            source=splits.sources.get(name, config.data.train_uri),
            name=f"{config.name}-{name}",
            targets=snake_case(config.data.target),
        )
        for name, frame in zip(names, (splits.train, splits.val, splits.test), strict=True)
    ]
    mlflow.log_inputs(datasets, contexts=list(names), tags_list=[{"sha256": digest}] * len(names))
    if splits.feedback is not None:
        log_feedback_input(splits, config)


def log_feedback_input(splits: Splits, config: JobConfig) -> None:
    """The feedback snapshot as a data set input of the run (its own sha256, not the combined one),
    and how its rows were used: the training and validation splits' rows include
    `data.feedback_train_rows` (a `data.val_fraction` share of them validates)."""
    assert splits.feedback is not None
    uri = splits.sources["feedback"]
    recent = 0 if splits.recent is None else len(splits.recent)
    rows = len(splits.feedback)
    dataset = mlflow_dataset_from_pandas(
        splits.feedback, source=uri, name=f"{config.name}-feedback", targets=snake_case(config.data.target)
    )
    tags = {"sha256": splits.digests[uri], "rows": str(rows), "recent_rows": str(recent)}
    mlflow.log_input(dataset, context="feedback", tags=tags)
    mlflow.log_params(
        {"data.feedback_rows": rows, "data.feedback_train_rows": rows - recent, "data.feedback_recent_rows": recent}
    )


def ray_datasets(pre: Preprocessor, splits: Splits) -> dict[str, Any]:
    return _as_ray_datasets({"train": pre.to_columns(splits.train), "val": pre.to_columns(splits.val)})


def _as_ray_datasets(frames: dict[str, pd.DataFrame]) -> dict[str, Any]:
    from ray.data import DataContext
    from ray.data.read_api import from_pandas

    DataContext.get_current().enable_progress_bars = False
    return {name: from_pandas(frame) for name, frame in frames.items()}


def training_data(pre: Preprocessor, splits: Splits) -> dict[str, Any]:
    """The preprocessed "train" and "val" splits for `fit`. At most `SHARD_CACHE_MAX_BYTES`
    together: one object ref per split to its columns as NumPy arrays, of which every worker takes
    its share (`TensorShard.share_of`). Ray Data would add, for data this small, an actor holding
    the datasets, a split coordinator per dataset and the workers' reads through them to every
    run's start. Larger: Ray Datasets, which stream."""
    frames = {"train": pre.to_columns(splits.train), "val": pre.to_columns(splits.val)}
    size = sum(int(frame.memory_usage(index=False).sum()) for frame in frames.values())
    if size > SHARD_CACHE_MAX_BYTES:
        return _as_ray_datasets(frames)
    return {name: ray.put({str(c): frame[c].to_numpy() for c in frame.columns}) for name, frame in frames.items()}


def _shared_columns(datasets: dict[str, Any]) -> dict[str, Any] | None:
    """The object refs of `training_data`'s in-memory form, or None for Ray Datasets."""
    refs = {name: value for name, value in datasets.items() if isinstance(value, ray.ObjectRef)}
    if refs and len(refs) != len(datasets):
        raise ValueError(f"datasets mix object refs and Ray Datasets: {sorted(datasets)}")
    return refs or None


def architecture_for(pre: Preprocessor, config: JobConfig) -> Architecture:
    return Architecture(
        cardinalities=pre.cardinalities,
        n_numeric=pre.n_numeric,
        n_outputs=pre.n_outputs,
        hidden=config.model.hidden,
        dropout=config.model.dropout,
        max_embedding_dim=config.model.max_embedding_dim,
    )


def loop_config(config: JobConfig, settings: Settings, pre: Preprocessor, run_id: str | None) -> dict[str, Any]:
    """What `train_loop_per_worker` (and `EpochLoop`) read: plain values that travel to the workers."""
    tc = config.train
    return {
        "task": config.task,
        "architecture": architecture_for(pre, config).model_dump(),
        "n_cat": len(pre.cardinalities),
        "n_num": pre.n_numeric,
        "epochs": tc.epochs,
        "batch_size": tc.batch_size,
        "lr": tc.lr,
        "weight_decay": tc.weight_decay,
        "patience": tc.patience,
        "lr_decay": tc.lr_decay,
        "lr_patience": tc.lr_patience,
        "seed": tc.seed,
        "torch_threads": int(tc.cpus_per_worker),
        "tracking_uri": settings.mlflow.tracking_uri,
        "run_id": run_id,
        "ddp_broadcast_buffers": DDP_BROADCAST_BUFFERS,
    }


def worker_scaling(config: JobConfig) -> Any:
    """The Ray Train worker group `config` asks for (a `ScalingConfig`)."""
    from ray.train import ScalingConfig

    tc = config.train
    return ScalingConfig(
        num_workers=tc.num_workers,
        use_gpu=tc.use_gpu,
        resources_per_worker={**tc.resources_per_worker, "CPU": tc.cpus_per_worker},
        placement_strategy=tc.placement_strategy,
    )


def fit(
    config: JobConfig,
    settings: Settings,
    pre: Preprocessor,
    datasets: dict[str, Any],
    run_id: str | None,
    callbacks: Sequence[Any] = (),
    run_name: str | None = None,
    standalone: bool = True,
) -> Fitted:
    """Run the Ray Train job on the "train" and "val" splits of `training_data` (or Ray Datasets,
    `ray_datasets`); returns the best weights, the number of epochs run and the run's phases. Tune
    trials pass datasets built once for all of them, the callback that reports each epoch to
    Tune, and `standalone=False` (see `trainer_class`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    store = run_store(settings)
    shared = _shared_columns(datasets)
    data_config = {"shared_data": shared} if shared else {"cache_shards": cache_shards(datasets)}
    trainer = trainer_class(standalone=standalone, ray_data=not shared)(
        train_loop_per_worker,
        train_loop_config={**loop_config(config, settings, pre, run_id), **data_config},
        scaling_config=worker_scaling(config),
        datasets=None if shared else datasets,
        run_config=RunConfig(
            name=run_name or f"{config.name}-{run_id or int(time.time())}",
            **store.run_config_kwargs(),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
            callbacks=list(callbacks),
        ),
    )
    fit_started = time.time()
    with trainer_environment(standalone=standalone), run_store_errors(store):
        result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    worker = WorkerTimings.from_dict(saved["timings"]) if "timings" in saved else None
    return Fitted(saved["best_model"], int(saved["epoch"]) + 1, fit_phases(fit_started, time.time(), worker))


@contextmanager
def run_store_errors(store: RunStore) -> Iterator[None]:
    """A run that failed because its store stopped answering says so: Ray Train only reports
    that its workers failed (after its retries, each of which fails on the store too)."""
    try:
        yield
    except Exception as exc:
        reason = unreachable_reason(store)
        if reason is not None:
            raise RunStoreUnreachableError(unreachable_message(store, reason)) from exc
        raise


@contextmanager
def _environment_default(name: str, value: str | None) -> Iterator[None]:
    """`name` set to `value` for the duration unless already set (or `value` is None). Ray Train
    reads its settings from the driver's environment when `fit` starts its controller."""
    if value is None or name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


@contextmanager
def trainer_environment(*, standalone: bool) -> Iterator[None]:
    """What Ray Train reads from this process's environment when `fit` starts its controller: the
    shorter health-check poll (kept for the process, unless already set), and for a standalone run
    no preemption watcher (see `trainer_class`)."""
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    with _environment_default(PREEMPTION_WATCHER_ENV, "0" if standalone else None):
        yield


def trainer_class(*, standalone: bool, ray_data: bool) -> type[Any]:
    """`TorchTrainer`, without two of the helpers Ray Train starts with every run when they have
    nothing to do. Each is an actor, so a process to start and import Ray Train in, on the
    machine the job's own workers are starting on:

    * the placement-group cleaner (a detached actor asking the State API every second whether the
      controller lives, and stopped at the end with one more such round): it frees the workers'
      placement group if the controller dies while its job goes on, as a Tune trial's does when
      ASHA stops it. A standalone run's job ends with its controller, and Ray removes the
      placement groups of a finished job and a dead creator itself.
    * the datasets manager, when the data reaches the workers without Ray Data (`training_data`).

    Which callbacks to leave out is read from Ray Train's own classes: a Ray upgrade that renames
    them fails the import here, loudly, rather than training differently
    (tests/unit/test_train_setup.py checks what is left)."""
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2.torch.torch_trainer import TorchTrainer  # what ray.train.torch exports under Train v2

    unneeded = tuple(
        kind
        for kind, needed in ((PlacementGroupCleanerCallback, not standalone), (DatasetsCallback, ray_data))
        if not needed
    )
    if not unneeded:
        return TorchTrainer

    class JobTrainer(TorchTrainer):
        def _create_default_callbacks(self) -> list[Any]:
            return [c for c in super()._create_default_callbacks() if not isinstance(c, unneeded)]

    return JobTrainer


def promote_if_enabled(
    client: MlflowClient,
    config: JobConfig,
    settings: Settings,
    model_name: str,
    version: str,
    predictor: TabularPredictor,
    splits: Splits,
) -> Decision | None:
    """The promotion gate, shared by training and tuning; None when the config turns it off."""
    if not config.promotion.enabled:
        return None
    actor = requester(settings.audit_actor)
    return gate(
        client,
        model_name,
        settings.champion_alias,
        version,
        predictor,
        config,
        splits.test,
        actor=actor,
        recent=splits.recent,
        settings=settings,
    )


def run_training(config: JobConfig, settings: Settings | None = None, phases: Phases | None = None) -> TrainingOutcome:
    settings = settings or get_settings()
    phases = phases or Phases()
    started = time.perf_counter()
    with phases.timed("tracking_check"):
        require_tracking_server(settings)
        require_run_store(run_store(settings))
        bound_request_retries()
        # The fluent API (runs, params, the model's upload) reads the process's tracking URI; every
        # client below is given it explicitly.
        mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
        mlflow.set_experiment(settings.mlflow.experiment)
        client = MlflowClient(settings.mlflow.tracking_uri)
    model_name = config.registered_model_name

    with phases.timed("data_load"):
        # Feedback rows join the training split before the schema and the preprocessor are fitted.
        splits = with_feedback(load_splits(config, settings), config, settings)
    with phases.timed("preprocess"):
        schema = build_schema(splits.train, config)
        pre = Preprocessor.fit(splits.train, schema)
        digest = combined_digest(splits.digests)
    with phases.timed("ray_init"):
        if not ray.is_initialized():
            ray.init(address=settings.ray.address, log_to_driver=True)

    with mlflow.start_run(run_name=f"train-{config.name}") as run:
        with phases.timed("mlflow_setup"):
            # Tags and params in one request (the client splits batches above the server's limits).
            rows = {
                "data.train_rows": len(splits.train),
                "data.val_rows": len(splits.val),
                "data.test_rows": len(splits.test),
            }
            client.log_batch(
                run.info.run_id,
                params=[Param(k, str(v)) for k, v in {**flat_params(config), **rows}.items()],
                tags=[
                    RunTag(k, str(v))
                    for k, v in {"job.kind": "train", **provenance_tags(settings, splits, digest)}.items()
                ],
            )
            log_job_files(client, run.info.run_id, config.model_dump(mode="json"), schema.model_dump_json(indent=2))
            log_inputs(splits, config, digest)

        with phases.timed("training_data"):
            datasets = training_data(pre, splits)
        fitted = fit(config, settings, pre, datasets, run.info.run_id)
        phases.update(fitted.phases)
        with phases.timed("calibrate_profile"):
            predictor = TabularPredictor.from_state_dict(pre, architecture_for(pre, config), fitted.best_state)
            # Calibrated before the test metrics: they score what gets registered and served.
            mlflow.log_metrics(calibrate_and_profile(predictor, splits.train, splits.val))
        with phases.timed("evaluate"):
            test_metrics = evaluate(predictor, splits.test)
            mlflow.log_metrics({f"test_{k}": v for k, v in test_metrics.items()} | {"epochs_run": fitted.epochs_run})
        with phases.timed("register"):
            version = log_and_register(predictor, splits.test, model_name, client, requester(settings.audit_actor))
        with phases.timed("gate"):
            decision = promote_if_enabled(client, config, settings, model_name, version.version, predictor, splits)
        # The phases of this run: the last call on it, so the figures cover everything before.
        mlflow.log_metrics(phases.metrics())
        return TrainingOutcome(
            run_id=run.info.run_id,
            model_name=model_name,
            model_version=version.version,
            test_metrics=test_metrics,
            epochs_run=fitted.epochs_run,
            promotion=decision,
            wall_time_s=time.perf_counter() - started,
            phases=phases.rounded(),
        )


def main(
    config: Path = typer.Option(REPO_ROOT / "jobs" / "configs" / "adult.yaml", "--config", help="job config YAML"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value, e.g. train.epochs=2"),
) -> None:
    """Train a model on the Ray cluster, log it to MLflow, register it and gate its promotion."""
    phases = Phases()
    phases.add("driver_start", since_process_start())
    settings = get_settings()
    configure_logging("trainer", settings.log_level)
    init_tracing("trainer", settings)
    job = load_config(config).with_overrides(dict(parse_override(o) for o in overrides))
    try:
        with span_from("training.run", settings.traceparent, attributes={"training.config": job.name}):
            outcome = run_training(job, phases=phases)
    finally:
        shutdown_tracing()
    report_outcome(outcome)


def report_outcome(outcome: TrainingOutcome) -> None:
    """The result line the dispatcher and `cluster demo` read; exit 3 when the gate refused to compare
    the new version with the champion (the version stays registered, and rejected)."""
    typer.echo(result_line(asdict(outcome)))
    if outcome.promotion is not None and outcome.promotion.rule.refusal:
        typer.echo(f"promotion refused: {outcome.promotion.reason}", err=True)
        raise typer.Exit(code=EXIT_NOT_PROMOTED)


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
