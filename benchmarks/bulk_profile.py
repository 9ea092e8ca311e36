"""Where a 1,000-row prediction request's time goes, and what the bulk path gives end to end.

    .venv/bin/python -m benchmarks.bulk_profile stages [--rows 1000] [--iterations 300]
    .venv/bin/python -m benchmarks.bulk_profile recording [--rows 1000] [--flushes 60]
    .venv/bin/python -m benchmarks.bulk_profile http [--duration 15] [--forms instances,columns,arrow] [--profile]
        [--single 10] [--profile-single]

- `stages`: each step of the replica's path for one request, timed in this process on one core
  and one torch thread (the replica's): reading the body, validating it, the model, encoding the
  answer, and what recording costs the replica, for each request form, next to the path before the
  columnar one (the standard library and pydantic reading the body, a column check over row dicts,
  `encode_records`, a dict per prediction, a `PredictionRow` per row: kept below as it was, to
  measure against) and next to the "in-process serving path" `make bench` reports as the ceiling.
  The model is the Adult config's network with untrained weights (the same arithmetic as a trained
  one), or `--model DIR|models:/...`.
- `recording`: flushes of prediction records into PostgreSQL (a throwaway database on this
  machine's server), the previous statement (a `jsonb_to_recordset` document of row objects) against
  the COPY of lines built at the flush: the serving process's CPU per 1,000 rows, PostgreSQL's
  (every `postgres` process, so the WAL writer's share too) and the wall time.
- `http`: a hermetic stack (`cluster/sandbox.py`, Nginx with TLS, recording into PostgreSQL on),
  a champion trained by one short job through the API, then wrk with 1,000-row requests at 4
  connections through Nginx for each form, the bare FastAPI peer (benchmarks/peer_fastapi.py) with
  the same `instances` body, and the in-process serving path, in that order in one run; the CPU of
  the replica + HAProxy + Nginx and of PostgreSQL during each platform run, and the rows recorded.
  `--profile` samples the replica with py-spy during the `instances` run. Then (`--single`
  seconds, 0 for none) one row per request at one connection through each hop in turn: Nginx
  with TLS, Serve's HAProxy port, the replica's own port, and the bare FastAPI peer; the
  differences of their mean latencies say what each hop adds, and the CPU the replica (or the bare
  server) spends per request says how much of a hop is work rather than waiting.
  `--profile-single` samples the replica with py-spy during the run at its own port and splits
  the samples by layer (`profile_layers`: Ray Serve, FastAPI and the rest of the ASGI stack,
  logging, the platform's code, the model, the event loop).

Every mode prints one JSON document (and `--out FILE` writes it). Nothing here asserts a time. The
`http` mode uses only what the platform had before the columnar path as well, so that it can
measure a checkout of the previous commit (`--forms instances`).
"""

from __future__ import annotations

import functools
import io
import json
import math
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import psutil
import typer

from benchmarks.peers import ADULT_CONFIG, sample_rows, time_calls

app = typer.Typer(add_completion=False)

ROWS = 1000
BULK_CONNECTIONS = 4


def _emit(result: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(result, indent=2, default=str)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


def _predictor(model: str | None, tracking_uri: str | None) -> Any:
    """A TabularPredictor: `model` (a directory or an MLflow URI), else the Adult config's network
    with untrained weights on preprocessing fitted to the test split."""
    if model is not None:
        from benchmarks.peer_fastapi import predictor_directory
        from benchmarks.peers import resolve_model_dir
        from jobs.predictor import TabularPredictor

        with tempfile.TemporaryDirectory() as tmp:
            return TabularPredictor.load(predictor_directory(resolve_model_dir(model, Path(tmp), tracking_uri)))
    from jobs.config import load_config
    from jobs.data.loading import load_test_frame
    from jobs.predictor import TabularPredictor
    from jobs.preprocess import Preprocessor
    from jobs.schema import build_schema
    from jobs.train import architecture_for

    config = load_config(ADULT_CONFIG)
    frame = load_test_frame(config)
    pre = Preprocessor.fit(frame, build_schema(frame, config))
    arch = architecture_for(pre, config)
    return TabularPredictor(pre, arch, arch.build())


def _bodies(rows: list[dict[str, Any]], names: list[str]) -> dict[str, tuple[str, bytes]]:
    """The same rows in every form: content type and body."""
    import pyarrow as pa
    import pyarrow.ipc as ipc
    import pyarrow.parquet as pq

    columns = {name: [row[name] for row in rows] for name in names}
    table = pa.table(columns)
    stream = io.BytesIO()
    with ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    parquet = io.BytesIO()
    pq.write_table(table, parquet)
    return {
        "instances": ("application/json", orjson.dumps({"instances": rows})),
        "columns": ("application/json", orjson.dumps({"columns": columns})),
        "arrow": ("application/vnd.apache.arrow.stream", stream.getvalue()),
        "parquet": ("application/vnd.apache.parquet", parquet.getvalue()),
    }


# The path before the columnar one, as it was, to measure against ---------------------------------


def _all_valid_before(validator: Any, rows: list[Any]) -> bool:
    """RowValidator._all_valid before the columnar path: a list per feature built from the row
    dicts, then a generator over it."""
    names = set(validator.feature_names)
    numeric = {f.name for f in validator.schema.numeric}
    nullable = {f.name for f in validator.schema.features if f.nullable}
    allowed = {f.name: frozenset(f.categories) | {None} for f in validator.schema.categorical}
    if not all(type(row) is dict and row.keys() == names for row in rows):
        return False
    for name in validator.feature_names:
        values = [row[name] for row in rows]
        if name in numeric:
            try:
                if not all(((type(v) is int or type(v) is float) and math.isfinite(v)) or v is None for v in values):
                    return False
            except OverflowError:
                return False
        elif not set(values) <= allowed[name]:
            return False
        if name not in nullable and None in values:
            return False
    return True


def _prediction_rows(request_id: str, rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> list[Any]:
    """A PredictionRow per row, as the request path built them before the columnar path."""
    from services.feedback.store import PredictionRow

    return [
        PredictionRow(
            request_id,
            i,
            "adult-income",
            "1",
            p.get("label"),
            p.get("probability"),
            instance,
            {"probabilities": p["probabilities"]} if "probabilities" in p else {"value": p.get("value")},
        )
        for i, (instance, p) in enumerate(zip(rows, predictions, strict=True))
    ]


def _record_before(rows: list[dict[str, Any]], predictions: list[dict[str, Any]]) -> str:
    """A PredictionRow per row on the request path, then the flush's document of row objects."""
    from services.feedback.store import prediction_rows_document

    return prediction_rows_document(_prediction_rows("request-id", rows, predictions))


# stages -------------------------------------------------------------------------------------------


def _ms(timed: dict[str, float]) -> dict[str, float]:
    return {"p50_ms": round(timed["p50_ms"], 4), "mean_ms": round(timed["mean_ms"], 4)}


@app.command()
def stages(
    rows: Annotated[int, typer.Option(help="rows per request")] = ROWS,
    iterations: Annotated[int, typer.Option(help="timed calls per stage")] = 300,
    model: Annotated[str | None, typer.Option(help="a predictor directory or MLflow model URI")] = None,
    tracking_uri: Annotated[str | None, typer.Option()] = None,
    out: Annotated[Path | None, typer.Option(help="also write the JSON here")] = None,
) -> None:
    """Each step of one request's path in this process, before and after the columnar path."""
    import torch

    from serve_apps.champion import AnswerNumbers, LoadedModel, RecordLines, to_predictions
    from serve_apps.routes.inference import read_body, validate
    from serve_apps.schemas import PredictRequest
    from serve_apps.validation import RowValidator

    torch.set_num_threads(1)
    predictor = _predictor(model, tracking_uri)
    validator = RowValidator(predictor.schema)
    loaded = LoadedModel("adult-income", "1", "run", predictor, validator, 0.0)
    schema = predictor.schema
    sample = sample_rows(rows)
    bodies = _bodies(sample, validator.feature_names)
    body = bodies["instances"][1]

    def timed(call: Callable[[], object]) -> dict[str, float]:
        return _ms(time_calls(call, rows, iterations))

    # Before: FastAPI's body parameter, the column check over dicts, encode_records, a dict per
    # prediction, a PredictionRow per row.
    parsed = PredictRequest.model_validate(json.loads(body)).instances
    outputs = predictor.record_outputs(parsed)
    predictions = to_predictions(outputs, schema.task, schema.classes)
    response = {"request_id": "r", "model": loaded.ref, "predictions": predictions}
    before = {
        "read (json.loads + pydantic)": timed(lambda: PredictRequest.model_validate(json.loads(body))),
        "validate (column check over row dicts)": timed(lambda: _all_valid_before(validator, parsed)),
        "model (encode_records + forward)": timed(lambda: predictor.record_outputs(parsed)),
        "answer (a dict per row + orjson)": timed(
            lambda: orjson.dumps({**response, "predictions": to_predictions(outputs, schema.task, schema.classes)})
        ),
        "record (a PredictionRow per row + the flush's document)": timed(lambda: _record_before(parsed, predictions)),
    }

    def read(form: str) -> Any:
        content_type, content = bodies[form]
        return read_body(content, content_type, 10 * rows)

    def steps(form: str) -> dict[str, dict[str, float]]:
        body_rows = read(form)
        batch = validate(body_rows, validator)
        assert not isinstance(batch, list), batch[:3]
        out_arrays = loaded.outputs(batch)
        # The answer's numbers are encoded once, for the response, and the record reuses them.
        numbers = AnswerNumbers.of(out_arrays, schema.task)

        def record() -> bytes:
            return RecordLines("request-id", loaded, numbers, batch)(0)

        return {
            "read": timed(lambda: read(form)),
            "validate": timed(lambda: validate(body_rows, validator)),
            "model (columns encoded + forward)": timed(lambda: loaded.outputs(batch)),
            "answer (PredictionsJson, its numbers included)": timed(lambda: loaded.answers.encode(out_arrays)),
            "record (the flush's COPY lines)": timed(record),
        }

    after = {form: steps(form) for form in bodies}
    encoded = predictor.preprocessor.encode_records(parsed)
    ceiling = {
        "forward alone (already encoded)": timed(lambda: predictor._outputs(encoded)),
        "in-process serving path (encode_records + model + to_predictions)": timed(
            lambda: to_predictions(predictor.record_outputs(parsed), schema.task, schema.classes)
        ),
    }
    result = {
        "rows": rows,
        "iterations": iterations,
        "body_bytes": {form: len(content) for form, (_, content) in bodies.items()},
        "before": before,
        "before_total_ms": round(sum(s["p50_ms"] for s in before.values()), 3),
        "after": after,
        "after_total_ms": {form: round(sum(s["p50_ms"] for s in steps.values()), 3) for form, steps in after.items()},
        "ceiling": ceiling,
    }
    _emit(result, out)


# recording ----------------------------------------------------------------------------------------


def _postgres_cpu_s() -> float:
    """CPU seconds of every process named postgres (the backends, the WAL writer, the checkpointer)."""
    total = 0.0
    for process in psutil.process_iter(["name", "cpu_times"]):
        if process.info["name"] == "postgres" and process.info["cpu_times"] is not None:
            times = process.info["cpu_times"]
            total += times.user + times.system
    return total


@app.command()
def recording(
    rows: Annotated[int, typer.Option(help="rows per request")] = ROWS,
    requests_per_flush: Annotated[int, typer.Option(help="requests buffered between two flushes")] = 5,
    flushes: Annotated[int, typer.Option(help="flushes timed per way")] = 60,
    out: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """Prediction records into PostgreSQL: the previous document of row objects against COPY."""
    import asyncio
    import uuid

    import psycopg

    from cluster.sandbox import temporary_database
    from serve_apps.champion import AnswerNumbers, LoadedModel, RecordLines, to_predictions
    from serve_apps.validation import RowValidator
    from services.feedback.store import INSERT_PREDICTION_ROWS, FeedbackStore, PredictionBatch

    predictor = _predictor(None, None)
    model = LoadedModel("adult-income", "1", "", predictor, RowValidator(predictor.schema), 0.0)
    sample = sample_rows(rows)
    batch = model.validator.from_rows(sample)
    assert batch is not None
    outputs = model.outputs(batch)
    numbers = AnswerNumbers.of(outputs, "classification")
    predictions = to_predictions(outputs, "classification", predictor.schema.classes)

    async def run(dsn: str) -> dict[str, Any]:
        store = FeedbackStore(dsn)
        await store.open()
        await store.migrate()
        figures: dict[str, Any] = {}
        try:
            for way in ("before: jsonb_to_recordset of row objects", "after: COPY of lines built at the flush"):
                python_s = 0.0
                wall: list[float] = []
                pg_before = _postgres_cpu_s()
                for _ in range(flushes):
                    ids = [uuid.uuid4().hex for _ in range(requests_per_flush)]
                    started = time.perf_counter()
                    cpu = time.process_time()
                    if way.startswith("before"):
                        text = _with_ids(sample, predictions, ids)
                        python_s += time.process_time() - cpu

                        async def op(conn: psycopg.AsyncConnection[Any], text: str = text) -> None:
                            await conn.execute(INSERT_PREDICTION_ROWS, (text,))

                        await store._retrying(op)
                    else:
                        batches = [
                            PredictionBatch(i, "adult-income", "1", rows, RecordLines(i, model, numbers, batch))
                            for i in ids
                        ]
                        lines = b"".join(b.lines(0) for b in batches)  # what record_predictions builds
                        python_s += time.process_time() - cpu
                        del lines
                        await store.record_predictions(batches)
                    wall.append(time.perf_counter() - started)
                pg_s = _postgres_cpu_s() - pg_before
                total_rows = flushes * requests_per_flush * rows
                figures[way] = {
                    "rows": total_rows,
                    "serving_process_cpu_ms_per_1000_rows": round(1000 * python_s / total_rows * 1000, 3),
                    "postgres_cpu_ms_per_1000_rows": round(1000 * pg_s / total_rows * 1000, 3),
                    "flush_wall_ms_p50": round(1000 * statistics.median(wall), 2),
                    "rows_per_s_of_postgres_cpu": round(total_rows / pg_s) if pg_s > 0 else None,
                }
        finally:
            await store.close()
        return figures

    with temporary_database("bulk_profile") as name:
        figures = asyncio.run(run(f"postgresql://postgres@127.0.0.1:5432/{name}"))
    _emit({"rows_per_request": rows, "requests_per_flush": requests_per_flush, "flushes": flushes, **figures}, out)


def _with_ids(rows: list[dict[str, Any]], predictions: list[dict[str, Any]], ids: list[str]) -> str:
    """The previous flush's document for these requests: a row object per prediction."""
    from services.feedback.store import prediction_rows_document

    return prediction_rows_document(
        [row for request_id in ids for row in _prediction_rows(request_id, rows, predictions)]
    )


# http ---------------------------------------------------------------------------------------------


def _cpu_by_kind(processes: list[psutil.Process]) -> dict[str, float]:
    """CPU seconds so far of the platform's processes: Nginx, HAProxy and the ingress replica."""
    seconds: dict[str, float] = {"nginx": 0.0, "haproxy": 0.0, "replica": 0.0}
    for process in processes:
        try:
            times = process.cpu_times()
            name = process.name()
        except psutil.Error:
            continue
        kind = "nginx" if "nginx" in name else "haproxy" if "haproxy" in name else "replica"
        seconds[kind] += times.user + times.system
    return seconds


def _arrow_body(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    table = pa.Table.from_pylist(rows)
    stream = io.BytesIO()
    with ipc.new_stream(stream, table.schema) as writer:
        writer.write_table(table)
    return stream.getvalue()


def _settled(count: Callable[[], int], quiet_s: float = 3.0, timeout_s: float = 60.0) -> int:
    """`count` once it has not changed for `quiet_s`."""
    last, changed, deadline = count(), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - changed < quiet_s and time.monotonic() < deadline:
        time.sleep(0.5)
        now = count()
        if now != last:
            last, changed = now, time.monotonic()
    return last


def _recorded_rows(dsn: str, since: float) -> int:
    import psycopg

    with psycopg.connect(dsn) as conn:
        found = conn.execute(
            "SELECT count(*) FROM predictions WHERE created_at >= to_timestamp(%s)", (since,)
        ).fetchone()
    return int(found[0]) if found else 0


@dataclass(frozen=True)
class BulkLoad:
    """How one request form is loaded: rows per request, connections, and seconds of warm-up and run."""

    rows: int
    connections: int
    warmup_s: float
    duration_s: float


def form_run(
    url: str,
    body: bytes,
    headers: dict[str, str],
    load: BulkLoad,
    platform: list[psutil.Process],
    dsn: str | None,
    spy: tuple[int, Path | None] | None = None,
) -> dict[str, Any]:
    """One request form under wrk after a warm-up: wrk's figures, the cores of the platform's
    processes (`platform`) and of PostgreSQL, and with `dsn` the prediction records: recorded
    during the run, once the replica's buffer has drained, answered, and dropped. `spy` (a pid and
    where `--out` goes) samples that replica with py-spy during the run. Also `make bench`'s
    serving phase (benchmarks/serving.py)."""
    from benchmarks.load import run_wrk

    run_wrk(url, body, headers, load.connections, load.warmup_s, rows_per_request=load.rows)
    if dsn is not None:  # the warm-up's records in before the run's are counted
        _settled(functools.partial(_recorded_rows, dsn, 0.0))
    since = time.time()
    cpu, pg = _cpu_by_kind(platform), _postgres_cpu_s()
    sampler = _start_py_spy(spy[0], load.duration_s, spy[1]) if spy is not None else None
    result = run_wrk(url, body, headers, load.connections, load.duration_s, rows_per_request=load.rows)
    figures = result.to_dict()
    used = _cpu_by_kind(platform)
    figures["cores"] = {kind: round((used[kind] - cpu[kind]) / result.duration_s, 3) for kind in used}
    figures["platform_cores"] = round(sum(figures["cores"].values()), 3)
    figures["postgres_cores"] = round((_postgres_cpu_s() - pg) / result.duration_s, 3)
    if sampler is not None:
        figures["profile"] = _finish_py_spy(*sampler)
    if dsn is not None:
        # Recorded during the run, then once the replica's buffer has drained: what is
        # missing then was dropped (PREDICTION_BUFFER_ROWS) because PostgreSQL fell behind.
        figures["rows_recorded_during_run"] = _recorded_rows(dsn, since)
        figures["rows_recorded"] = _settled(functools.partial(_recorded_rows, dsn, since))
        figures["rows_answered"] = result.requests * load.rows
        figures["rows_dropped"] = max(0, figures["rows_answered"] - figures["rows_recorded"])
    return figures


def form_ratios(runs: dict[str, dict[str, Any]], peer_rows_per_s: float, ceiling_rows_per_s: float) -> dict[str, Any]:
    """Each form's rows/s against the bare FastAPI server's and the in-process serving path's, and its
    p99 over its p50."""
    return {
        form: {
            "vs_fastapi": round(figures["rows_per_s"] / peer_rows_per_s, 3) if peer_rows_per_s else None,
            "vs_in_process": round(figures["rows_per_s"] / ceiling_rows_per_s, 3) if ceiling_rows_per_s else None,
            "p99_over_p50": round(figures["p99_ms"] / figures["p50_ms"], 2) if figures["p50_ms"] else None,
        }
        for form, figures in runs.items()
    }


@app.command()
def http(
    duration: Annotated[float, typer.Option(help="seconds per measured run")] = 15.0,
    warmup: Annotated[float, typer.Option(help="seconds of warm-up before each")] = 3.0,
    forms: Annotated[str, typer.Option(help="request forms sent to the platform")] = "instances,columns,arrow",
    profile: Annotated[bool, typer.Option(help="py-spy the replica during the instances run")] = False,
    iterations: Annotated[int, typer.Option(help="calls of the in-process serving path")] = 300,
    single: Annotated[
        float, typer.Option(help="seconds per single-row run at 1 connection on each hop (0: none)")
    ] = 10.0,
    profile_single: Annotated[
        bool, typer.Option(help="py-spy the replica during the single-row run at its own port")
    ] = False,
    out: Annotated[Path | None, typer.Option()] = None,
) -> None:
    """1,000-row requests through Nginx (TLS, recording on) against the bare FastAPI server with the
    same body and the in-process serving path, in one run; then single rows at 1 connection through
    each hop (Nginx, HAProxy, the replica's own port) and on the bare server."""
    from benchmarks.load import run_wrk
    from benchmarks.loop import retrain_loop
    from benchmarks.peers import fastapi_peer
    from benchmarks.serving import in_process_serving_path, platform_processes
    from cluster.edge import bearer_headers, local_edge_url
    from cluster.sandbox import hermetic_stack, replica_pids

    sample = sample_rows(ROWS)
    result: dict[str, Any] = {"rows_per_request": ROWS, "connections": BULK_CONNECTIONS, "duration_s": duration}
    with hermetic_stack("bulk") as stack, stack.client() as client:
        settings = stack.settings
        loop = retrain_loop(client, {"train.epochs": 1})
        model_uri = f"models:/{settings.model.name}/{loop['version_after']}"
        result["model_uri"] = model_uri
        edge = f"{local_edge_url(settings)}/v1/predict"
        auth = bearer_headers(stack.api_key)
        names = list(sample[0])
        bodies = {
            "instances": ("application/json", orjson.dumps({"instances": sample})),
            "columns": ("application/json", orjson.dumps({"columns": {n: [r[n] for r in sample] for n in names}})),
            "arrow": ("application/vnd.apache.arrow.stream", _arrow_body(sample)),
        }
        dsn = settings.database.url.get_secret_value() if settings.database.url else None
        platform = platform_processes(settings)
        runs: dict[str, Any] = {}
        for form in forms.split(","):
            content_type, body = bodies[form]
            headers = {**auth, "Content-Type": content_type}
            spy = (replica_pids(settings)[0], out) if profile and form == "instances" else None
            bulk = BulkLoad(ROWS, BULK_CONNECTIONS, warmup, duration)
            runs[form] = form_run(edge, body, headers, bulk, platform, dsn, spy)
        result["platform"] = runs
        hops: dict[str, str] = {}
        if single > 0:
            hops = {"nginx_tls": edge, "haproxy": f"{settings.serve.url}/v1/predict"}
            port = _replica_port(settings)
            if port is not None:
                hops["replica"] = f"http://127.0.0.1:{port}/v1/predict"
            one_row = orjson.dumps({"instances": sample[:1]})
            headers = {**auth, "Content-Type": "application/json"}
            replica = replica_pids(settings)[0]
            result["single_row"] = {
                hop: _single_row(
                    url,
                    one_row,
                    headers,
                    warmup,
                    single,
                    server_pid=replica,
                    spy=(replica, out) if profile_single and hop == "replica" else None,
                )
                for hop, url in hops.items()
            }
        with (
            tempfile.TemporaryDirectory(prefix="bulk-peer-") as scratch,
            fastapi_peer(model_uri, Path(scratch), tracking_uri=settings.mlflow.tracking_uri) as peer,
        ):
            body = peer.body(sample)
            run_wrk(peer.url, body, peer.headers, BULK_CONNECTIONS, warmup, rows_per_request=ROWS)
            peer_cpu = peer.cpu_s()
            load = run_wrk(peer.url, body, peer.headers, BULK_CONNECTIONS, duration, rows_per_request=ROWS)
            result["fastapi"] = {
                **load.to_dict(),
                "server_cores": round((peer.cpu_s() - peer_cpu) / load.duration_s, 3),
            }
            if single > 0:
                result["single_row"]["fastapi"] = _single_row(
                    peer.url, peer.body(sample[:1]), peer.headers, warmup, single, server_pid=peer.process.pid
                )
        result["in_process"] = in_process_serving_path(
            model_uri, settings.mlflow.tracking_uri, sample, (ROWS,), iterations
        )[0]
    result["ratios"] = form_ratios(
        result["platform"], result["fastapi"]["rows_per_s"], result["in_process"]["rows_per_s"]
    )
    if single > 0:
        result["single_row_breakdown"] = _breakdown(result["single_row"])
    _emit(result, out)


def _replica_port(settings: Any) -> int | None:
    """The HTTP port the first ingress replica listens on itself (HAProxy's backend server)."""
    from cluster.sandbox import replica_pids

    base, count = settings.serve.replica_port_base, settings.serve.replica_port_count
    for pid in replica_pids(settings):
        try:
            connections = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN and base <= connection.laddr.port < base + count:
                return int(connection.laddr.port)
    return None


def _single_row(
    url: str,
    body: bytes,
    headers: dict[str, str],
    warmup: float,
    duration: float,
    server_pid: int | None = None,
    spy: tuple[int, Path | None] | None = None,
) -> dict[str, Any]:
    """One row per request at one connection: the latency of each request alone, and the CPU the
    server's process (`server_pid` and its children) spent per request; `spy` samples a process
    with py-spy meanwhile."""
    from benchmarks.load import run_wrk
    from benchmarks.peers import process_tree_cpu_s

    run_wrk(url, body, headers, 1, warmup, threads=1)
    cpu_before = process_tree_cpu_s(server_pid) if server_pid is not None else 0.0
    sampler = _start_py_spy(spy[0], duration, spy[1], "single-row") if spy is not None else None
    load = run_wrk(url, body, headers, 1, duration, threads=1)
    keys = ("rps", "p50_ms", "p90_ms", "p99_ms", "mean_ms", "requests", "errors")
    figures = load.to_dict()
    result = {key: figures[key] for key in keys}
    if server_pid is not None and load.requests:
        spent = process_tree_cpu_s(server_pid) - cpu_before
        result["server_cpu_ms_per_request"] = round(1000 * spent / load.requests, 3)
    if sampler is not None:
        result["profile"] = _finish_py_spy(*sampler, by_layer=True)
    return result


# Where a sample's time belongs: the innermost frame that matches one of these (py-spy names a
# frame's file from its package: "(serve_apps/ingress.py:317)", "(numpy/_core/...)").
LAYERS = (
    ("platform code", ("(serve_apps/", "(cluster/", "(core/")),
    ("model and preprocessing", ("(jobs/", "torch/", "numpy/")),
    ("prediction recording", ("psycopg",)),
    ("Ray Serve", ("ray/serve/", "ray/util/", "ray/_private/", "ray/_common/")),
    ("FastAPI, Starlette, uvicorn, pydantic", ("fastapi/", "starlette/", "uvicorn/", "pydantic", "httptools")),
    ("logging", ("logging/",)),
    ("event loop and threads", ("asyncio/", "threading.py", "concurrent/", "selectors.py")),
)


def _layer(frame: str) -> str | None:
    for name, markers in LAYERS:
        if any(marker in frame for marker in markers):
            return name
    return None


def profile_layers(raw: str) -> dict[str, float]:
    """py-spy's raw stacks as shares of the samples by layer: each sample goes to the layer of its
    innermost frame that belongs to one (so the standard library called by our code counts as
    ours), "other" when no frame does."""
    from benchmarks.serving import collapsed_stacks

    counts: Counter[str] = Counter()
    for frames, n in collapsed_stacks(raw):
        layers = [layer for layer in map(_layer, frames) if layer is not None]
        counts[layers[-1] if layers else "other"] += n
    total = sum(counts.values())
    return {layer: round(n / total, 3) for layer, n in counts.most_common()} if total else {}


def _breakdown(single_row: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Where a lone request's time goes: the mean latency each hop adds to the one behind it, and
    the replica's own against the bare server's."""
    mean = {hop: figures["mean_ms"] for hop, figures in single_row.items()}
    shares: dict[str, Any] = {}
    if "nginx_tls" in mean and "haproxy" in mean:
        shares["nginx_tls_ms"] = round(mean["nginx_tls"] - mean["haproxy"], 3)
    if "haproxy" in mean and "replica" in mean:
        shares["haproxy_ms"] = round(mean["haproxy"] - mean["replica"], 3)
    if "replica" in mean and "fastapi" in mean:
        shares["replica_beyond_bare_server_ms"] = round(mean["replica"] - mean["fastapi"], 3)
    if "fastapi" in mean:
        shares["bare_server_ms"] = round(mean["fastapi"], 3)
    if "nginx_tls" in single_row and "fastapi" in single_row and single_row["fastapi"]["rps"]:
        shares["edge_vs_bare_rps"] = round(single_row["nginx_tls"]["rps"] / single_row["fastapi"]["rps"], 3)
    return shares


def _start_py_spy(
    pid: int, seconds: float, out: Path | None, name: str = "replica"
) -> tuple[subprocess.Popen[bytes], Path]:
    from benchmarks.serving import _py_spy

    raw = (out.parent if out is not None else Path(tempfile.gettempdir())) / f"bulk-profile-{name}.txt"
    record = ["record", "-p", str(pid), "-d", str(max(1, round(seconds - 1))), "-r", "250", "--gil", "--nonblocking"]
    process = subprocess.Popen([_py_spy(), *record, "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL)
    return process, raw


def _finish_py_spy(process: subprocess.Popen[bytes], raw: Path, by_layer: bool = False) -> dict[str, Any]:
    from benchmarks.serving import summarise_profile

    process.wait(timeout=120)
    stacks = raw.read_text(encoding="utf-8")
    summary = summarise_profile(stacks, top=30)
    summary["file"] = str(raw)
    if by_layer:
        summary["layers"] = profile_layers(stacks)
    return summary


if __name__ == "__main__":
    app()
