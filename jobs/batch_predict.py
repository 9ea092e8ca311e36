"""Batch inference on Ray Data: score a CSV or Parquet data set with a registered model version.

    python -m jobs.batch_predict --model adult-income@champion --input in/adult.csv --output out/scores.parquet
    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m jobs.batch_predict --model adult-income/3 --input s3://bucket/in/ --output s3://bucket/out/scores

or `POST /v1/training-jobs` with `{"kind": "batch_predict", "overrides": {"model": ..., "input": ...,
"output": ...}}`. The input streams through Ray Data (reads -> an actor pool whose actors each load
the model once -> Parquet writes) with the object store memory it may hold capped, so memory stays
bounded whatever the input's size. Rows the model's schema refuses (the serving path's rules,
jobs/validation.py) go to a rejects folder next to the output with their key, the field and the
reason. Output and rejects are written to a staging folder and moved in place at the end: a job
that fails leaves nothing at the output. docs/batch-inference.md has the formats and the rules.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import mlflow
import pyarrow as pa
import pyarrow.fs as pafs
import typer
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from core.logs import configure_logging
from core.settings import Settings, get_settings
from core.telemetry import current_ids, init_tracing, shutdown_tracing, span_from
from jobs.batch_config import (
    DEFAULT_CONFIG_PATH,
    BatchConfig,
    BatchRefusedError,
    LocationError,
    Locations,
    ModelRef,
    Plan,
    load_batch_config,
    plan,
)
from jobs.batch_io import (
    FILE_COLUMN,
    ROW_COLUMN,
    ROW_ID_COLUMNS,
    BatchInput,
    Piece,
    ReadSpec,
    Staging,
    count_rows,
    ensure_a_file,
    filesystem_for,
    input_files,
    input_schema,
    plan_pieces,
)
from jobs.batch_scoring import MODEL_COLUMNS, REJECT_COLUMNS, ModelFiles, Reconciled, Scorer, ScoringSpec
from jobs.config import parse_override
from jobs.predictor import TabularPredictor
from jobs.registry import download_model, predictor_dir, requester, requester_tags
from jobs.result import result_line
from jobs.rollout import alias_version
from jobs.schema import DataSchema, snake_case
from jobs.tracking import bound_request_retries, require_tracking_server
from jobs.validation import column_problem, is_text

log = logging.getLogger(__name__)
KIND = "batch_predict"
# The job cannot run as asked (an unknown model, an unreadable input, ...): it printed its result
# line with the reason, and another attempt would fail the same way.
EXIT_REFUSED = 4
MIB = 1024**2
_ABSENT = {ErrorCode.Name(RESOURCE_DOES_NOT_EXIST), ErrorCode.Name(INVALID_PARAMETER_VALUE)}


@dataclass
class BatchOutcome:
    """The result line of a batch job (what the dispatcher records on the training-jobs record)."""

    run_id: str
    model_name: str
    model_version: str
    input: str
    output: str
    rejects: str
    rows: int  # rows scored, in the output
    rejected_rows: int  # rows refused, in the rejects
    rows_per_s: float  # input rows (scored and refused) per second of the whole job
    wall_time_s: float
    pipeline_s: float  # of which Ray Data's pipeline, from the first read to the last write
    kind: str = KIND


# The model and the input, reconciled -------------------------------------------------------------


def prediction_fields(schema: DataSchema) -> list[pa.Field]:
    """What the HTTP predict answers per row: label, probability and probabilities, or value."""
    if schema.task == "regression":
        return [pa.field("value", pa.float64())]
    classes = [pa.field(name, pa.float64()) for name in schema.classes or []]
    return [
        pa.field("label", pa.string()),
        pa.field("probability", pa.float64()),
        pa.field("probabilities", pa.struct(classes)),
    ]


def _feature_columns(schema: DataSchema, names: list[str]) -> dict[str, str]:
    """Each feature's input column: the same name, else the one column whose snake_case name it is
    (as training data is read: `education-num` feeds `education_num`)."""
    by_snake: dict[str, list[str]] = {}
    for name in names:
        by_snake.setdefault(snake_case(name), []).append(name)
    found, missing = {}, []
    for feature in schema.feature_names:
        candidates = [feature] if feature in names else by_snake.get(feature, [])
        if len(candidates) > 1:
            raise BatchRefusedError(f"input: the columns {candidates} all read as the feature {feature!r}")
        if not candidates:
            missing.append(feature)
        else:
            found[feature] = candidates[0]
    if missing:
        shown = ", ".join(names[:40]) + (", ..." if len(names) > 40 else "")
        raise BatchRefusedError(
            f"input: the model needs the columns {', '.join(missing)} (its features), which the input "
            f"does not have (it has: {shown})"
        )
    return found


def reconcile(schema: DataSchema, columns: pa.Schema, keys: list[str] | None, text_numbers: bool = False) -> Reconciled:
    """Match the input's columns to the model; BatchRefusedError naming the field when they cannot be.
    `text_numbers`: the input is CSV, whose numbers are text until they are read."""
    names = list(columns.names)
    features = _feature_columns(schema, names)
    for spec in schema.features:
        problem = column_problem(spec, columns.field(features[spec.name]).type, text_numbers)
        if problem is not None:
            raise BatchRefusedError(f"input: the column {features[spec.name]!r} {problem}")
    if keys is None:
        used = set(features.values())
        chosen = [name for name in names if name not in used] or list(ROW_ID_COLUMNS)
    else:
        unknown = [key for key in keys if key not in names and key not in ROW_ID_COLUMNS]
        if unknown:
            raise BatchRefusedError(
                f"keys: the input has no column {unknown[0]!r} (key columns are input columns, "
                f"or {FILE_COLUMN} and {ROW_COLUMN})"
            )
        chosen = list(keys)
    predictions = prediction_fields(schema)
    taken = {f.name for f in predictions} | set(MODEL_COLUMNS) | set(REJECT_COLUMNS)
    clash = [key for key in chosen if key in taken]
    if clash:
        raise BatchRefusedError(
            f"keys: the key column {clash[0]!r} has the name of an output or rejects column; "
            "list the key columns to copy in `keys`"
        )
    key_fields = [
        columns.field(key) if key in names else pa.field(key, pa.string() if key == FILE_COLUMN else pa.int64())
        for key in chosen
    ]
    model_fields = [pa.field(name, pa.string()) for name in MODEL_COLUMNS]
    reject_fields = [
        pa.field("field", pa.string()),
        pa.field("error", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("fields", pa.list_(pa.string())),
    ]
    read = list(dict.fromkeys([*features.values(), *(key for key in chosen if key in names)]))
    return Reconciled(
        features=features,
        categorical=tuple(spec.name for spec in schema.categorical),
        text_numbers=text_numbers,
        keys=tuple(chosen),
        read_columns=tuple(read),
        output_schema=pa.schema([*key_fields, *predictions, *model_fields]),
        rejects_schema=pa.schema([*key_fields, *reject_fields]),
    )


def dictionary_columns(reconciled: Reconciled, columns: pa.Schema) -> tuple[str, ...]:
    """The Parquet text columns of the categorical features, to read dictionary-encoded (CSV
    columns are read as text)."""
    if reconciled.text_numbers:
        return ()
    categorical = set(reconciled.categorical)
    return tuple(
        column
        for feature, column in reconciled.features.items()
        if feature in categorical and is_text(columns.field(column).type)
    )


# The driver --------------------------------------------------------------------------------------


def resolve_version(client: MlflowClient, ref: ModelRef) -> str:
    """The registered version `ref` names now; BatchRefusedError when the registry has none."""
    try:
        client.get_registered_model(ref.name)
    except MlflowException as exc:
        if exc.error_code in _ABSENT:
            raise BatchRefusedError(f"model: there is no registered model named {ref.name!r}") from exc
        raise
    if ref.version is not None:
        try:
            return str(client.get_model_version(ref.name, ref.version).version)
        except MlflowException as exc:
            if exc.error_code in _ABSENT:
                raise BatchRefusedError(f"model: {ref.name!r} has no version {ref.version}") from exc
            raise
    assert ref.alias is not None
    found = alias_version(client, ref.name, ref.alias)
    if found is None:
        raise BatchRefusedError(f"model: {ref.name!r} has no version with the alias {ref.alias!r}")
    return str(found.version)


def refusal_in(exc: BaseException) -> BatchRefusedError | None:
    """The BatchRefusedError behind an error Ray raised from a read or an actor, if it is one."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, BatchRefusedError):
            return current
        cause = getattr(current, "cause", None)  # RayTaskError keeps the task's own exception here
        current = cause if isinstance(cause, BaseException) else (current.__cause__ or current.__context__)
    return None


@contextlib.contextmanager
def data_context(settings: Settings) -> Iterator[None]:
    """Ray Data's settings for the job, restored afterwards (the process may run other pipelines)."""
    from ray.data import DataContext

    context = DataContext.get_current()
    saved = (context.target_max_block_size, context.execution_options.resource_limits, context.enable_progress_bars)
    batch = settings.batch
    context.target_max_block_size = batch.block_size_mb * MIB
    context.enable_progress_bars = False  # one line per update in a Ray job's log
    if batch.object_store_limit_mb is not None:
        limits = context.execution_options.resource_limits
        context.execution_options.resource_limits = limits.copy(object_store_memory=batch.object_store_limit_mb * MIB)
    try:
        yield
    finally:
        context.target_max_block_size, context.execution_options.resource_limits, context.enable_progress_bars = saved


def score(
    pieces: list[Piece],
    fs_in: pafs.FileSystem,
    read: ReadSpec,
    spec: ScoringSpec,
    settings: Settings,
    destination: tuple[str, pafs.FileSystem],
    batch_size: int,
    actors: int,
) -> None:
    """Run the Ray Data pipeline: read -> score on the actor pool -> write Parquet to `destination`."""
    from ray.data import ActorPoolStrategy, read_datasource

    staged_output, fs_out = destination
    batch = settings.batch
    with data_context(settings), warnings.catch_warnings():
        # Said of every input of fewer files or blocks than BATCH_IO_CONCURRENCY: the cap is a bound, not a goal.
        warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
        # Said of every input of fewer pieces than actors: a small input needs no more.
        warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
        # Reads and writes reserve no CPU: the actors may hold every CPU without starving them. One
        # block per piece to start with: Ray Data would otherwise split them to reach its own parallelism.
        stream = read_datasource(
            BatchInput(pieces, fs_in, read),
            concurrency=batch.io_concurrency,
            num_cpus=0,
            override_num_blocks=len(pieces),
        )
        scored = stream.map_batches(
            Scorer,
            fn_constructor_kwargs={"spec": spec},
            batch_format="pyarrow",
            batch_size=batch_size,
            compute=ActorPoolStrategy(size=actors),
            num_cpus=batch.cpus_per_actor,
        )
        scored.write_parquet(
            staged_output,
            filesystem=fs_out,
            min_bytes_per_file=batch.file_size_mb * MIB,
            concurrency=batch.io_concurrency,
            ray_remote_args={"num_cpus": 0},
            use_dictionary=text_columns(spec.reconciled.output_schema),
        )


def text_columns(schema: pa.Schema) -> list[str]:
    """The output's text columns, the only ones worth dictionary-encoding in Parquet: they repeat
    (labels, the model's name and version, often the keys), while scores are almost all distinct,
    so a dictionary tried on them is work the writer throws away."""
    return [field.name for field in schema if pa.types.is_string(field.type) or pa.types.is_large_string(field.type)]


def _run_tags(settings: Settings, ref: ModelRef, version: str) -> dict[str, str]:
    import ray

    ids = current_ids()
    tags = {
        "job.kind": KIND,
        "model.name": ref.name,
        "model.version": version,
        "ray.job_id": str(ray.get_runtime_context().get_job_id()),
        **requester_tags(requester(settings.audit_actor)),
    }
    if ids:
        tags["trace_id"] = ids[0]
    if settings.training.job_id:
        tags["training_job.id"] = settings.training.job_id
    return tags


def _params(
    config: BatchConfig,
    ref: ModelRef,
    version: str,
    where: Plan,
    keys: tuple[str, ...],
    batch_size: int,
    actors: int,
    files: int,
) -> dict[str, Any]:
    return {
        "model": ref.name,
        "version": version,
        "model_reference": str(ref),
        "input": where.input.uri,
        "output": where.output.uri,
        "rejects": where.rejects.uri,
        "input_format": where.format,
        "input_files": files,
        "keys": json.dumps(list(keys))[:500],
        "batch_size": batch_size,
        "actors": actors,
    }


def run_batch(config: BatchConfig, settings: Settings | None = None) -> BatchOutcome:
    """Score `config.input` with the model into `config.output`; BatchRefusedError when the job
    cannot run as asked (nothing is written then), any other error for what may pass on a retry."""
    settings = settings or get_settings()
    known: dict[str, str] = {}
    try:
        return _run(config, settings, known)
    except BatchRefusedError as exc:
        exc.details.update(known)
        raise


def _run(config: BatchConfig, settings: Settings, known: dict[str, str]) -> BatchOutcome:
    started = time.perf_counter()
    try:
        where = plan(config, Locations.from_settings(settings))
    except LocationError as exc:
        raise BatchRefusedError(str(exc)) from exc
    ref = config.model_ref(settings.champion_alias)
    known["model_name"] = ref.name
    require_tracking_server(settings)
    bound_request_retries()
    tracking_uri = settings.mlflow.tracking_uri
    # The fluent API (the run) and MLflow's models:/ resolution read the process's tracking URI.
    mlflow.set_tracking_uri(tracking_uri)
    version = resolve_version(MlflowClient(tracking_uri), ref)
    known["model_version"] = version
    with tempfile.TemporaryDirectory(prefix="batch-model-") as tmp:
        folder = predictor_dir(download_model(f"models:/{ref.name}/{version}", Path(tmp), tracking_uri))
        model = ModelFiles.read(folder)
        predictor = TabularPredictor.load(folder)

    fmt = where.format
    fs_in, fs_out = filesystem_for(where.input, settings), filesystem_for(where.output, settings)
    files = input_files(fs_in, where.input, fmt)
    columns = input_schema(fs_in, files[0], fmt, config.csv)
    reconciled = reconcile(predictor.schema, columns, config.keys, text_numbers=fmt == "csv")
    pieces = plan_pieces(fs_in, files, fmt, settings.batch.block_size_mb * MIB)
    staging = Staging.next_to(where.output, where.rejects)
    staging.refuse_existing(fs_out, config.overwrite)
    batch_size = config.batch_size or settings.batch.batch_size
    actors = config.actors or settings.batch.actors

    import ray

    if not ray.is_initialized():
        ray.init(address=settings.ray.address, log_to_driver=True)
    mlflow.set_experiment(settings.mlflow.experiment)
    with mlflow.start_run(run_name=f"batch-{ref.name}-{version}") as run:
        known["run_id"] = run.info.run_id
        mlflow.set_tags(_run_tags(settings, ref, version))
        mlflow.log_params(_params(config, ref, version, where, reconciled.keys, batch_size, actors, len(files)))
        spec = ScoringSpec(
            model=model,
            model_name=ref.name,
            model_version=version,
            reconciled=reconciled,
            rejects_folder=staging.staged_rejects,
            filesystem=fs_out,
            torch_threads=max(1, int(settings.batch.cpus_per_actor)),
        )
        read = ReadSpec(
            where.input, fmt, reconciled.read_columns, config.csv, batch_size, dictionary_columns(reconciled, columns)
        )
        try:
            staging.prepare(fs_out)
            pipeline_started = time.perf_counter()
            log.info("scoring %d file(s) in %d pieces with %s version %s", len(files), len(pieces), ref.name, version)
            try:
                score(pieces, fs_in, read, spec, settings, (staging.staged_output, fs_out), batch_size, actors)
            except Exception as exc:
                refused = refusal_in(exc)
                if refused is not None:
                    raise BatchRefusedError(str(refused)) from exc
                raise
            pipeline_s = time.perf_counter() - pipeline_started
            log.info("pipeline done in %.1fs (%.1fs after the job started)", pipeline_s, time.perf_counter() - started)
            rows = count_rows(fs_out, staging.staged_output)
            rejected = count_rows(fs_out, staging.staged_rejects)
            ensure_a_file(fs_out, staging.staged_output, reconciled.output_schema, "part-empty.parquet")
            ensure_a_file(fs_out, staging.staged_rejects, reconciled.rejects_schema, "rejects-empty.parquet")
            wall_time_s = time.perf_counter() - started
            outcome = BatchOutcome(
                run_id=run.info.run_id,
                model_name=ref.name,
                model_version=version,
                input=where.input.uri,
                output=where.output.uri,
                rejects=where.rejects.uri,
                rows=rows,
                rejected_rows=rejected,
                rows_per_s=(rows + rejected) / wall_time_s,
                wall_time_s=wall_time_s,
                pipeline_s=pipeline_s,
            )
            mlflow.log_metrics(
                {
                    "rows": rows,
                    "rejected_rows": rejected,
                    "input_rows": rows + rejected,
                    "rows_per_s": outcome.rows_per_s,
                    "wall_time_s": wall_time_s,
                    "pipeline_s": pipeline_s,
                }
            )
            staging.commit(fs_out, {**asdict(outcome), "finished_at": datetime.now(UTC).isoformat()})
        except BaseException:
            staging.discard(fs_out)
            raise
    return outcome


# The command line ---------------------------------------------------------------------------------


def build_config(
    config_path: Path,
    overrides: list[str],
    model: str | None,
    input_uri: str | None,
    output: str | None,
    input_format: str | None,
) -> BatchConfig:
    """The config file, then the `--set` overrides, then the flags (which win)."""
    values: dict[str, Any] = dict(parse_override(o) for o in overrides)
    flags = {"model": model, "input": input_uri, "output": output, "input_format": input_format}
    values.update({key: value for key, value in flags.items() if value is not None})
    return load_batch_config(config_path).with_overrides(values)


def refuse(message: str, **known: Any) -> NoReturn:
    """Print the result line of a job that cannot run as asked and exit EXIT_REFUSED."""
    typer.echo(result_line({"kind": KIND, "error": message, **known}))
    typer.echo(f"batch prediction refused: {message}", err=True)
    raise typer.Exit(code=EXIT_REFUSED)


def _validation_message(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def main(
    model: str | None = typer.Option(None, "--model", help="NAME, NAME@alias or NAME/version (NAME: its champion)"),
    input_uri: str | None = typer.Option(None, "--input", help="a CSV or Parquet file or folder: a path or s3://"),
    output: str | None = typer.Option(None, "--output", help="the Parquet folder to write: a path or s3://"),
    input_format: str | None = typer.Option(None, "--format", help="csv or parquet (default: from the input's name)"),
    config: Path = typer.Option(DEFAULT_CONFIG_PATH, "--config", help="batch job config YAML"),
    overrides: list[str] = typer.Option([], "--set", help="override a config value, e.g. keys=[id]"),
) -> None:
    """Score a data set with a registered model on Ray Data; write predictions and rejects as Parquet."""
    settings = get_settings()
    configure_logging("batch_predict", settings.log_level)
    init_tracing("batch_predict", settings)
    try:
        job = build_config(config, overrides, model, input_uri, output, input_format)
    except ValidationError as exc:
        refuse(_validation_message(exc))
    except (ValueError, FileNotFoundError) as exc:
        refuse(str(exc))
    try:
        with span_from("batch_predict.run", settings.traceparent, attributes={"batch.model": job.model or ""}):
            outcome = run_batch(job, settings)
    except BatchRefusedError as exc:
        refuse(str(exc), **exc.details)
    finally:
        shutdown_tracing()
    typer.echo(result_line(asdict(outcome)))


if __name__ == "__main__":
    # Plain tracebacks: they end up in Ray job logs, where rich's boxes are noise.
    cli = typer.Typer(pretty_exceptions_enable=False, add_completion=False)
    cli.command()(main)
    cli()
