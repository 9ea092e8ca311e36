"""Batch inference on Ray Data against the model scored in-process on one core, with memory bounded.

    .venv/bin/python -m benchmarks.batch_predict [--rows 5000000] [--out benchmarks/results]

`make bench` calls `batch_inference(rows)`: one run, returning (and here printing) a dict.

1. Data: `rows` rows of the Adult schema, Adult's training rows sampled with replacement and noise
   (numbers moved a little, a few categories swapped for another of the column's), written to one
   Parquet file a chunk at a time, so generating never holds more than a chunk.
2. Model: the default Adult config's network behind preprocessing fitted on Adult, registered in a
   throwaway MLflow store (SQLite and local artifacts in a temporary folder). Its weights are
   untrained: scoring costs the same as with trained ones, and no training job runs first.
3. In-process, one core: the model loaded here with `jobs.registry.load_predictor`, torch on one
   thread, over the Parquet file in chunks of BATCH_BATCH_SIZE rows (the first `baseline_rows`
   rows: the rate is steady long before), reading included: `predict_frame`, the predictor's own
   API (the baseline of the goal), and the batch job's scorer (its checks and its Arrow encoding,
   what each actor runs, without Ray: what Ray's parallelism is measured against).
4. The batch job: `jobs.batch_predict.run_batch` (what `python -m jobs.batch_predict` runs) on a
   fresh local Ray with this machine's cores and the object store capped at `object_store_mib`, far
   below the data's size in memory: the job streams or fails. Rows per second over the whole job
   (model resolution, Ray Data's start, the actors' model loads, writing and committing included),
   and the peak memory of this process and Ray's (raylet, workers, object store), sampled: the sum
   of RSS (which counts the object store's shared pages in every process that maps them) and of
   PSS (which shares them out).

The goal (issue 21): the job at >= 1.5x the one-core in-process rate.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import typer

from cluster.sandbox import free_port
from core.settings import REPO_ROOT, Settings, get_settings

RESULTS = REPO_ROOT / "benchmarks" / "results"
ADULT_CONFIG = REPO_ROOT / "jobs" / "configs" / "adult.yaml"
MODEL_NAME = "adult-batch-bench"
GOAL = 1.5
CHUNK_ROWS = 250_000
MIB = 1024**2
# Numeric features moved by up to this share of their spread; categories swapped this often.
NUMERIC_NOISE = 0.05
CATEGORY_SWAP = 0.02


def adult_frame() -> pd.DataFrame:
    """Adult's training rows as a job reads them (snake_case columns, missing values as NaN)."""
    from jobs.config import load_config
    from jobs.data.loading import parse_blob
    from jobs.data.storage import read_uri

    config = load_config(ADULT_CONFIG)
    return parse_blob(read_uri(config.data.train_uri), config.data, config.data.skip_rows)


def noisy_chunk(source: pd.DataFrame, rows: int, rng: np.random.Generator) -> pd.DataFrame:
    chunk = source.iloc[rng.integers(0, len(source), rows)].reset_index(drop=True)
    for name in chunk.columns:
        column = chunk[name]
        if pd.api.types.is_numeric_dtype(column):
            spread = float(np.nanstd(source[name])) or 1.0
            moved = column + rng.normal(0, NUMERIC_NOISE * spread, rows)
            chunk[name] = np.clip(np.round(moved), source[name].min(), source[name].max()).astype(column.dtype)
        elif name != "income":
            swap = rng.random(rows) < CATEGORY_SWAP
            categories = source[name].dropna().unique()
            chunk.loc[swap, name] = rng.choice(categories, int(swap.sum()))
    return chunk


def generate(path: Path, rows: int, seed: int = 7) -> Path:
    """`rows` noisy Adult rows in one Parquet file, written CHUNK_ROWS at a time."""
    source = adult_frame()
    rng = np.random.default_rng(seed)
    writer: pq.ParquetWriter | None = None
    try:
        for start in range(0, rows, CHUNK_ROWS):
            table = pa.Table.from_pandas(noisy_chunk(source, min(CHUNK_ROWS, rows - start), rng), preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()
    return path


def register_model(tracking_uri: str, artifacts: Path) -> str:
    """The Adult-shaped model, registered with the champion alias; returns its version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from jobs.config import load_config
    from jobs.data.loading import load_splits
    from jobs.predictor import TabularPredictor
    from jobs.preprocess import Preprocessor
    from jobs.registry import log_and_register
    from jobs.schema import build_schema
    from jobs.train import architecture_for

    config = load_config(ADULT_CONFIG)
    splits = load_splits(config)
    pre = Preprocessor.fit(splits.train, build_schema(splits.train, config))
    architecture = architecture_for(pre, config)
    predictor = TabularPredictor(pre, architecture, architecture.build())
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("batch-bench-model", artifact_location=artifacts.as_uri())
    with mlflow.start_run(experiment_id=experiment):
        version = log_and_register(predictor, splits.test, MODEL_NAME, client)
    client.set_registered_model_alias(MODEL_NAME, "champion", version.version)
    return str(version.version)


def _timed(batches: Iterator[pa.RecordBatch], rows: int, score: Any) -> dict[str, Any]:
    done = 0
    started = time.perf_counter()
    for batch in batches:
        score(batch)
        done += batch.num_rows
        if done >= rows:
            break
    elapsed = time.perf_counter() - started
    return {"rows": done, "seconds": round(elapsed, 2), "rows_per_s": round(done / elapsed)}


def in_process_rates(model_uri: str, tracking_uri: str, path: Path, rows: int, batch_rows: int) -> dict[str, Any]:
    """Rows per second in this process on one thread over the first `rows` rows, reading included:
    `predict_frame` (the predictor's own API: the baseline), and the batch job's scorer (the same
    checks and encoding as its actors, built as they are from the version's files, without Ray)."""
    import pyarrow.fs as pafs
    import torch

    from jobs.batch_io import STREAM_NAMES
    from jobs.batch_predict import reconcile
    from jobs.batch_scoring import ModelFiles, Scorer, ScoringSpec
    from jobs.registry import download_model, predictor_dir

    threads = torch.get_num_threads()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model = ModelFiles.read(predictor_dir(download_model(model_uri, Path(tmp) / "model", tracking_uri)))
            predictor = model.load()
            parquet = pq.ParquetFile(path)
            reconciled = reconcile(predictor.schema, parquet.schema_arrow, None)
            rejects = Path(tmp) / "rejects"
            rejects.mkdir()
            spec = ScoringSpec(model, MODEL_NAME, "", reconciled, str(rejects), pafs.LocalFileSystem(), 1)
            scorer = Scorer(spec)  # one torch thread, as the actors, for both measures

            def scored(batch: pa.RecordBatch) -> None:
                table = pa.Table.from_batches([batch])
                table = table.append_column(STREAM_NAMES["input_file"], pa.repeat(pa.scalar("x"), batch.num_rows))
                scorer(table.append_column(STREAM_NAMES["input_row"], pa.array(np.arange(batch.num_rows))))

            frames = parquet.iter_batches(batch_size=batch_rows, columns=predictor.schema.feature_names)
            baseline = _timed(frames, rows, lambda batch: predictor.predict_frame(batch.to_pandas()))
            tables = parquet.iter_batches(batch_size=batch_rows, columns=list(reconciled.read_columns))
            return {"predict_frame": baseline, "batch_scorer": _timed(tables, rows, scored)}
    finally:
        torch.set_num_threads(threads)


class MemorySampler:
    """The summed RSS and PSS of this process and its descendants (Ray's processes), sampled."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_rss = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = pss = 0
        for process in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                info = process.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> MemorySampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


@contextlib.contextmanager
def local_ray(cpus: int, object_store_mib: int) -> Iterator[None]:
    """A fresh single-node Ray with `cpus` CPUs and the object store capped, on a free GCS port."""
    import ray

    port = free_port()
    temp_dir = f"/tmp/rbp{port}"  # Ray's unix socket paths must stay short
    saved = os.environ.get("RAY_GCS_SERVER_PORT")
    os.environ["RAY_GCS_SERVER_PORT"] = str(port)  # read once, when Ray starts its GCS
    try:
        ray.init(
            address="local",
            num_cpus=cpus,
            object_store_memory=object_store_mib * MIB,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=temp_dir,
        )
    finally:
        if saved is None:
            os.environ.pop("RAY_GCS_SERVER_PORT", None)
        else:
            os.environ["RAY_GCS_SERVER_PORT"] = saved
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def spilled_mib() -> float:
    """What the object store of the connected Ray has spilled to disk so far, plus what it holds
    outside the store for want of room in it now (fallback allocation): streaming needs neither."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    state = get_state_from_address(ray.get_runtime_context().gcs_address)  # type: ignore[no-untyped-call]
    stats = get_memory_info_reply(state).store_stats  # type: ignore[no-untyped-call]
    return float(stats.spilled_bytes_total + stats.object_store_bytes_fallback) / MIB


def arrow_size(path: Path) -> float:
    """The file's size once read into Arrow, from its first row group (the others are alike)."""
    parquet = pq.ParquetFile(path)
    first = parquet.read_row_group(0)
    return first.nbytes * parquet.metadata.num_rows / max(1, first.num_rows)


def batch_settings(base: Settings, tracking_uri: str, data_dir: Path) -> Settings:
    mlflow = base.mlflow.model_copy(update={"tracking_uri": tracking_uri, "experiment": "batch-bench"})
    batch = base.batch.model_copy(update={"data_dir": data_dir})
    return base.model_copy(update={"mlflow": mlflow, "batch": batch})


def batch_inference(
    rows: int = 5_000_000,
    object_store_mib: int = 256,
    baseline_rows: int = 1_000_000,
    cpus: int | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """The benchmark (see the module's docstring); `workdir` keeps the data (default: a temporary folder)."""
    from jobs.batch_config import BatchConfig
    from jobs.batch_predict import run_batch

    cpus = cpus or os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        root = workdir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="batch-bench-")))
        data_dir = root / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        started = time.perf_counter()
        source = generate(data_dir / "adult-noisy.parquet", rows)
        generate_s = time.perf_counter() - started
        version = register_model(tracking_uri, root / "artifacts")
        settings = batch_settings(get_settings(), tracking_uri, data_dir)
        model_uri = f"models:/{MODEL_NAME}/{version}"
        in_process = in_process_rates(
            model_uri, tracking_uri, source, min(rows, baseline_rows), settings.batch.batch_size
        )
        baseline = in_process["predict_frame"]

        output = data_dir / "scores.parquet"
        shutil.rmtree(output, ignore_errors=True)
        shutil.rmtree(data_dir / "scores.rejects.parquet", ignore_errors=True)
        config = BatchConfig(model=f"{MODEL_NAME}@champion", input=source.name, output=output.name)
        with local_ray(cpus, object_store_mib), MemorySampler() as memory:
            outcome = run_batch(config, settings)
            spilled = spilled_mib()
        return {
            "rows": rows,
            "input_file_mib": round(source.stat().st_size / MIB, 1),
            "input_in_memory_mib": round(arrow_size(source) / MIB),
            "generate_s": round(generate_s, 1),
            "cpus": cpus,
            "actors": settings.batch.actors,
            "batch_size": settings.batch.batch_size,
            "object_store_mib": object_store_mib,
            "in_process_one_core": in_process,
            "job": {
                "rows": outcome.rows,
                "rejected_rows": outcome.rejected_rows,
                "wall_s": round(outcome.wall_time_s, 2),
                "pipeline_s": round(outcome.pipeline_s, 2),
                "rows_per_s": round(outcome.rows_per_s),
                "peak_rss_mib": round(memory.peak_rss / MIB),
                "peak_pss_mib": round(memory.peak_pss / MIB),
                "spilled_mib": spilled,
            },
            "ratio_to_one_core": round(outcome.rows_per_s / baseline["rows_per_s"], 2),
            "ratio_to_scorer_one_core": round(outcome.rows_per_s / in_process["batch_scorer"]["rows_per_s"], 2),
            "goal_ratio": GOAL,
        }


def main(
    rows: int = typer.Option(5_000_000, "--rows", min=1, help="rows to generate and score"),
    object_store_mib: int = typer.Option(256, "--object-store-mib", min=64, help="Ray's object store cap"),
    baseline_rows: int = typer.Option(1_000_000, "--baseline-rows", min=1, help="rows scored in-process"),
    out: Path = typer.Option(RESULTS, "--out", help="folder for batch_predict.json"),
) -> None:
    """Score generated Adult rows with Ray Data and in-process; print and save the figures."""
    figures = batch_inference(rows, object_store_mib, baseline_rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_predict.json").write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    typer.echo(json.dumps(figures, indent=2))


if __name__ == "__main__":
    typer.run(main)
