"""Hyperparameter search with Ray Tune: ASHA early stopping, one MLflow child run per trial.

    python -m jobs.tune --config jobs/configs/adult-tune.yaml [--set tune.num_samples=2]
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python -m jobs.tune --config jobs/configs/adult-tune.yaml

Every trial runs the training loop of `jobs.train` in its own `TorchTrainer` (Ray Train v2 inside a
Tune trial), on datasets and a preprocessor built once by this driver. The best trial's weights
are evaluated on the test split, registered from the trial's own MLflow run and gated for
promotion exactly like a training job's.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import ray
import torch
import typer
from mlflow.entities import Param, RunStatus
from mlflow.entities.model_registry import ModelVersion
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from ray.exceptions import RayActorError

from core.logs import configure_logging
from core.settings import REPO_ROOT, Settings, get_settings
from core.telemetry import init_tracing, shutdown_tracing, span_from
from jobs.config import Distribution, JobConfig, candidate_values, load_config, parse_override
from jobs.config import TuneConfig as TuneSection
from jobs.data.loading import Splits, combined_digest, load_splits
from jobs.evaluate import evaluate
from jobs.feedback_data import with_feedback
from jobs.finish import calibrate_and_profile
from jobs.predictor import TabularPredictor
from jobs.preprocess import Preprocessor
from jobs.promote import Decision
from jobs.registry import log_and_register, log_job_files, requester
from jobs.run_store import RunStore, require_run_store, run_store
from jobs.schema import build_schema
from jobs.tracking import bound_request_retries, require_tracking_server
from jobs.train import (
    CHECKPOINT_FILE,
    TrainingOutcome,
    architecture_for,
    fit,
    flat_params,
    log_inputs,
    promote_if_enabled,
    provenance_tags,
    ray_datasets,
    report_outcome,
    run_store_errors,
)

if TYPE_CHECKING:
    from ray.tune import Result, ResultGrid, Tuner

log = logging.getLogger(__name__)
SearchSpace = dict[str, dict[Distribution, list[Any]]]

# The trial itself only waits on its Train controller (0 CPUs) and workers (reserved by Ray Train),
# so a token share keeps two trials plus their workers inside 4 logical CPUs next to Serve.
TRIAL_DRIVER_CPUS = 0.25
TRIAL_ID_TAG = "tune.trial_id"
EARLY_STOPPED_TAG = "tune.early_stopped"
MLFLOW_PARAMS_PER_BATCH = 100  # the tracking server's limit for one log_batch call


@dataclass
class TuningOutcome(TrainingOutcome):
    best_run_id: str = ""
    trials: int = 0
    best_params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialContext:
    """What every trial needs from the driver; shipped once through the object store."""

    base: JobConfig
    settings: Settings
    pre: Preprocessor
    schema_json: str
    experiment_id: str
    parent_run_id: str
    tags: dict[str, str]  # provenance copied onto every child run
    name: str  # the Tune experiment; trials name their Ray Train runs after it


# Search space --------------------------------------------------------------------------------


def _encode(value: Any) -> Any:
    # Tune walks lists inside configs as nested parameters, so a list-valued choice such as
    # model.hidden=[128, 64] travels through Tune as its JSON text.
    return json.dumps(value) if isinstance(value, list | dict) else value


def _decode(spec: dict[Distribution, list[Any]], value: Any) -> Any:
    options = spec.get("choice", [])
    # A point to evaluate may hold a value outside the options: decode by kind, not by lookup.
    if isinstance(value, str) and any(isinstance(option, list | dict) for option in options):
        return json.loads(value)
    return value


def tune_domain(spec: dict[Distribution, list[Any]]) -> Any:
    """One search-space entry of the job config as a ray.tune distribution."""
    from ray import tune

    ((kind, args),) = spec.items()
    if kind == "choice":
        return tune.choice([_encode(option) for option in args])
    samplers = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    return samplers[kind](*args)


def param_space(space: SearchSpace) -> dict[str, Any]:
    return {key: tune_domain(spec) for key, spec in space.items()}


def encode_point(point: dict[str, Any]) -> dict[str, Any]:
    return {key: _encode(value) for key, value in point.items()}


def decode_params(params: dict[str, Any], space: SearchSpace) -> dict[str, Any]:
    """A trial's Tune config back to config values (JSON-encoded choices decoded)."""
    return {key: _decode(space[key], value) if key in space else value for key, value in params.items()}


def _tune_section(config: JobConfig) -> TuneSection:
    if config.tune is None:
        raise ValueError(f"job config {config.name!r} has no `tune:` section (see jobs/configs/adult-tune.yaml)")
    return config.tune


def trial_config(base: JobConfig, params: dict[str, Any]) -> JobConfig:
    """A trial's plain training config: the base, the sampled values, the trial's worker count."""
    tc = _tune_section(base)
    overrides = {**decode_params(params, tc.search_space), "train.num_workers": tc.trial_workers, "tune": None}
    return base.with_overrides(overrides)


def max_epochs(config: JobConfig) -> int:
    spec = _tune_section(config).search_space.get("train.epochs")
    return max(candidate_values(spec)) if spec else config.train.epochs


# Trial side ----------------------------------------------------------------------------------


def _log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(key, str(value)) for key, value in params.items()]
    for start in range(0, len(items), MLFLOW_PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + MLFLOW_PARAMS_PER_BATCH])


def _start_child_run(client: MlflowClient, context: TrialContext, config: JobConfig, trial_id: str) -> str:
    run = client.create_run(
        context.experiment_id,
        run_name=f"trial-{trial_id}",
        tags={
            **context.tags,
            MLFLOW_PARENT_RUN_ID: context.parent_run_id,
            TRIAL_ID_TAG: trial_id,
            "job.kind": "tune-trial",
        },
    )
    run_id: str = run.info.run_id
    _log_params(client, run_id, flat_params(config))
    # The registered version's run is the best trial's: the config and schema go on each trial.
    log_job_files(client, run_id, config.model_dump(mode="json"), context.schema_json)
    return run_id


def run_trial(params: dict[str, Any], context: TrialContext, datasets: dict[str, Any]) -> None:
    """One Tune trial: the training job's loop in a TorchTrainer, each epoch reported to Tune.

    When ASHA stops the trial, Ray kills this actor and, with it, the Train controller and workers
    it owns; the driver then closes the MLflow run left RUNNING.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    trial_id = tune.get_context().get_trial_id()
    config = trial_config(context.base, params)
    client = MlflowClient(context.settings.mlflow.tracking_uri)
    run_id = _start_child_run(client, context, config, trial_id)
    try:
        fit(
            config,
            context.settings,
            context.pre,
            datasets,
            run_id,
            callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call]  # Ray leaves it untyped
            run_name=f"{context.name}-{trial_id}",
            # ASHA kills this trial while the tuning job goes on: Ray Train's cleaner must free
            # the placement group of its workers.
            standalone=False,
        )
    except RayActorError:
        # When ASHA stops this trial, Ray kills the Train controller it owns first, and `fit` may
        # see that death before this actor is killed too. Only the driver knows whether the trial
        # was stopped (its run then ends FINISHED, early-stopped) or crashed (FAILED): it closes it.
        raise
    except Exception as exc:
        client.set_tag(run_id, "tune.error", repr(exc)[:500])
        client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))
        raise
    client.set_tag(run_id, EARLY_STOPPED_TAG, "false")
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))


# Driver side ---------------------------------------------------------------------------------


def _connect(settings: Settings) -> None:
    if ray.is_initialized():
        return
    # When ASHA stops a trial, its Train controller dies with it and Ray Train's detached
    # placement-group cleaner must free the workers' CPUs. The cleaner finds the cluster through
    # RAY_ADDRESS; without it, a second Ray instance on the host (a test stack next to the dev
    # stack) makes it fail, the CPUs stay reserved and the next trials wait forever.
    env_vars = {"RAY_ADDRESS": settings.ray.address} if settings.ray.address else {}
    ray.init(address=settings.ray.address, log_to_driver=True, runtime_env={"env_vars": env_vars})


def tuner(context: TrialContext, datasets: dict[str, Any]) -> Tuner:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tc = _tune_section(context.base)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, context=context, datasets=datasets), {"CPU": TRIAL_DRIVER_CPUS}
    )
    return tune.Tuner(
        trainable,
        param_space=param_space(tc.search_space),
        tune_config=tune.TuneConfig(
            metric=tc.metric,
            mode=tc.mode,
            num_samples=tc.num_samples,
            # One past the longest possible trial: ASHA stops a trial that reaches max_t, which
            # would kill a trial finishing on its own and mislabel it as stopped early.
            scheduler=ASHAScheduler(
                max_t=max_epochs(context.base) + 1,
                grace_period=tc.grace_period,
                reduction_factor=tc.reduction_factor,
            ),
            search_alg=BasicVariantGenerator(
                points_to_evaluate=[encode_point(p) for p in tc.points_to_evaluate] or None,
                max_concurrent=tc.max_concurrent_trials,
                random_state=context.base.train.seed,
            ),
            # A fresh actor per trial: stopping a trial must take its Train controller with it.
            reuse_actors=False,
        ),
        run_config=tune.RunConfig(name=context.name, verbose=1, **run_store(context.settings).run_config_kwargs()),
    )


def _trial_id(result: Result) -> str | None:
    value = result.metrics.get("trial_id") if result.metrics else None
    return str(value) if value else None


def _child_runs(client: MlflowClient, context: TrialContext) -> dict[str, Any]:
    runs = client.search_runs(
        [context.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{context.parent_run_id}'"
    )
    return {run.data.tags[TRIAL_ID_TAG]: run for run in runs if TRIAL_ID_TAG in run.data.tags}


def trial_results(grid: ResultGrid) -> list[Result]:
    return [grid[index] for index in range(len(grid))]


def _close_child_runs(client: MlflowClient, context: TrialContext, results: list[Result]) -> dict[str, str]:
    """End every child run a stopped or crashed trial left RUNNING; returns trial id -> run id."""
    reported = {_trial_id(r) for r in results if r.error is None}
    children = _child_runs(client, context)
    for trial_id, run in children.items():
        if run.info.status != RunStatus.to_string(RunStatus.RUNNING):
            continue  # the trial closed its own run: it finished or raised
        if trial_id not in reported:  # the trial errored or its actor died
            client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
            continue
        # Only the scheduler stops a trial from outside without an error.
        client.set_tag(run.info.run_id, EARLY_STOPPED_TAG, "true")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FINISHED))
    return {trial_id: run.info.run_id for trial_id, run in children.items()}


def _best_weights(result: Result, store: RunStore) -> tuple[dict[str, Any], int]:
    from ray.train import Checkpoint
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    path = (result.metrics or {}).get(CHECKPOINT_PATH_KEY)
    if not path:
        raise RuntimeError(f"best trial {_trial_id(result)} reported no checkpoint")
    # On the object store the reported path has no scheme: the run store's filesystem reads it.
    with Checkpoint(path, filesystem=store.filesystem).as_directory() as directory:
        saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    return saved["best_model"], int(saved["epoch"]) + 1


def _best_result(grid: ResultGrid, tc: TuneSection) -> Result:
    results = trial_results(grid)
    if all(r.error is not None for r in results):
        raise RuntimeError(f"all {len(results)} trials failed; first error: {results[0].error!r}")
    return grid.get_best_result(metric=tc.metric, mode=tc.mode, scope="all")


def _record_on_parent(best_run_id: str, best_params: dict[str, Any], decision: Decision | None) -> None:
    mlflow.log_params({f"best_trial.{k}": json.dumps(v) if isinstance(v, list) else v for k, v in best_params.items()})
    mlflow.set_tag("tune.best_run_id", best_run_id)
    if decision is not None:  # the gate tags the version's run (the best trial); this is the job's run
        mlflow.set_tags({"promotion.decision": decision.label, "promotion.reason": decision.reason})


def _open_parent(
    client: MlflowClient,
    run_id: str,
    config: JobConfig,
    splits: Splits,
    digest: str,
    tags: dict[str, str],
    schema_json: str,
) -> None:
    mlflow.set_tags({"job.kind": "tune", **tags})
    mlflow.log_params(flat_params(config))
    mlflow.log_params(
        {"data.train_rows": len(splits.train), "data.val_rows": len(splits.val), "data.test_rows": len(splits.test)}
    )
    log_job_files(client, run_id, config.model_dump(mode="json"), schema_json)
    log_inputs(splits, config, digest)


def _register_from_trial(
    client: MlflowClient,
    run_id: str,
    predictor: TabularPredictor,
    splits: Splits,
    model_name: str,
    metrics: dict[str, float],
    settings: Settings,
) -> ModelVersion:
    # Registered from the trial's run, so the version points at the run that trained it.
    with mlflow.start_run(run_id=run_id, nested=True):
        mlflow.log_metrics(metrics)
        return log_and_register(predictor, splits.test, model_name, client, requester(settings.audit_actor))


def run_tuning(config: JobConfig, settings: Settings | None = None) -> TuningOutcome:
    settings = settings or get_settings()
    started = time.perf_counter()
    tc = _tune_section(config)
    require_tracking_server(settings)
    store = run_store(settings)
    require_run_store(store)
    bound_request_retries()
    mlflow.set_tracking_uri(settings.mlflow.tracking_uri)
    experiment_id = mlflow.set_experiment(settings.mlflow.experiment).experiment_id
    model_name = config.registered_model_name

    # Feedback rows join the training split before the schema and the preprocessor are fitted.
    splits = with_feedback(load_splits(config, settings), config, settings)
    schema = build_schema(splits.train, config)
    pre = Preprocessor.fit(splits.train, schema)  # once, for every trial
    digest = combined_digest(splits.digests)
    _connect(settings)
    datasets = ray_datasets(pre, splits)
    client = MlflowClient(settings.mlflow.tracking_uri)

    schema_json = schema.model_dump_json(indent=2)

    with mlflow.start_run(run_name=f"tune-{config.name}") as parent:
        tags = provenance_tags(settings, splits, digest)
        _open_parent(client, parent.info.run_id, config, splits, digest, tags, schema_json)
        context = TrialContext(
            base=config,
            settings=settings,
            pre=pre,
            schema_json=schema_json,
            experiment_id=experiment_id,
            parent_run_id=parent.info.run_id,
            tags=tags,
            name=f"tune-{config.name}-{parent.info.run_id[:8]}",
        )
        with run_store_errors(store):
            grid = tuner(context, datasets).fit()
            run_ids = _close_child_runs(client, context, trial_results(grid))
            best = _best_result(grid, tc)
            best_run_id = run_ids[str(_trial_id(best))]
            best_params = decode_params(best.config or {}, tc.search_space)
            best_config = trial_config(config, best.config or {})
            log.info("best of %d trials: %s (run %s) with %s", len(grid), _trial_id(best), best_run_id, best_params)
            best_state, epochs_run = _best_weights(best, store)
        predictor = TabularPredictor.from_state_dict(pre, architecture_for(pre, best_config), best_state)
        # Calibrated before the test metrics: they score what gets registered and served.
        calibration = calibrate_and_profile(predictor, splits.train, splits.val)
        test_metrics = evaluate(predictor, splits.test)
        # On the parent run and on the best trial's, which the version points at.
        scores = {**{f"test_{k}": v for k, v in test_metrics.items()}, **calibration, "epochs_run": epochs_run}
        mlflow.log_metrics({**scores, "tune.trials": len(grid)})
        version = _register_from_trial(client, best_run_id, predictor, splits, model_name, scores, settings)
        decision = promote_if_enabled(client, best_config, settings, model_name, version.version, predictor, splits)
        _record_on_parent(best_run_id, best_params, decision)
        return TuningOutcome(
            run_id=parent.info.run_id,
            model_name=model_name,
            model_version=version.version,
            test_metrics=test_metrics,
            epochs_run=epochs_run,
            promotion=decision,
            wall_time_s=time.perf_counter() - started,
            best_run_id=best_run_id,
            trials=len(grid),
            best_params=best_params,
        )


def main(
    config: Path = typer.Option(REPO_ROOT / "jobs" / "configs" / "adult-tune.yaml", "--config", help="job config YAML"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value, e.g. tune.num_samples=2"),
) -> None:
    """Search hyperparameters with Ray Tune (ASHA), register the best trial's model, gate its promotion."""
    settings = get_settings()
    configure_logging("tuner", settings.log_level)
    init_tracing("tuner", settings)
    job = load_config(config).with_overrides(dict(parse_override(o) for o in overrides))
    try:
        with span_from("tuning.run", settings.traceparent, attributes={"training.config": job.name}):
            outcome = run_tuning(job)
    finally:
        shutdown_tracing()
    report_outcome(outcome)


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
