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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import ray
import torch
import typer
from mlflow.data.pandas_dataset import from_pandas as mlflow_dataset_from_pandas
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
from jobs.schema import build_schema, snake_case
from jobs.tracking import bound_request_retries, require_tracking_server
from jobs.train_worker import CHECKPOINT_FILE as CHECKPOINT_FILE  # re-exported: jobs.tune reads it
from jobs.train_worker import train_loop_per_worker

log = logging.getLogger(__name__)
# Workers read their shards once and train from memory (`TensorShard`) when all data sets together
# are at most this large in the object store; larger ones stream from Ray Data every epoch.
SHARD_CACHE_MAX_BYTES = 512 * 1024**2
# Ray Train's controller collects reports by polling its workers, every 2 s by default, and a
# worker's `ray.train.report` blocks until its previous report was collected: epochs shorter than
# the interval each waited for it, most of a short job's wall time (benchmarks/README.md). A poll is
# one small actor call per worker. The environment variable, when set, still decides.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.1"
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
    for name, frame in (("train", splits.train), ("validation", splits.val), ("test", splits.test)):
        dataset = mlflow_dataset_from_pandas(
            frame,
            source=splits.sources.get(name, config.data.train_uri),
            name=f"{config.name}-{name}",
            targets=snake_case(config.data.target),
        )
        mlflow.log_input(dataset, context=name, tags={"sha256": digest})
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
    from ray.data import DataContext
    from ray.data.read_api import from_pandas

    DataContext.get_current().enable_progress_bars = False
    return {"train": from_pandas(pre.to_columns(splits.train)), "val": from_pandas(pre.to_columns(splits.val))}


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


def fit(
    config: JobConfig,
    settings: Settings,
    pre: Preprocessor,
    datasets: dict[str, Any],
    run_id: str | None,
    callbacks: Sequence[Any] = (),
    run_name: str | None = None,
) -> Fitted:
    """Run the Ray Train job on the "train" and "val" Ray Datasets; returns the best weights, the
    number of epochs run and the run's phases. Tune trials pass datasets built once for all of
    them and the callback that reports each epoch to Tune."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = config.train
    # Read from this process's environment when the trainer starts its controller.
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config(config, settings, pre, run_id), "cache_shards": cache_shards(datasets)},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers,
            use_gpu=tc.use_gpu,
            resources_per_worker={**tc.resources_per_worker, "CPU": tc.cpus_per_worker},
            placement_strategy=tc.placement_strategy,
        ),
        datasets=datasets,
        run_config=RunConfig(
            name=run_name or f"{config.name}-{run_id or int(time.time())}",
            storage_path=settings.resolved_storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=2),
            callbacks=list(callbacks),
        ),
    )
    fit_started = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training produced no checkpoint")
    with result.checkpoint.as_directory() as directory:
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    worker = WorkerTimings.from_dict(saved["timings"]) if "timings" in saved else None
    return Fitted(saved["best_model"], int(saved["epoch"]) + 1, fit_phases(fit_started, time.time(), worker))


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
            mlflow.set_tags({"job.kind": "train", **provenance_tags(settings, splits, digest)})
            mlflow.log_params(flat_params(config))
            mlflow.log_params(
                {
                    "data.train_rows": len(splits.train),
                    "data.val_rows": len(splits.val),
                    "data.test_rows": len(splits.test),
                }
            )
            log_job_files(client, run.info.run_id, config.model_dump(mode="json"), schema.model_dump_json(indent=2))
            log_inputs(splits, config, digest)

        with phases.timed("ray_datasets"):
            datasets = ray_datasets(pre, splits)
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
