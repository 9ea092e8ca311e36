"""What tracing costs on `POST /v1/predict`: the same stack and model measured with tracing off
and on (spans exported over OTLP/HTTP to a local receiver), alternating, with wrk.

    .venv/bin/python -m benchmarks.tracing_overhead [--connections 16] [--duration 20] [--rounds 2]

Starts its own stack (own ports, state dir, databases), trains a one-epoch model, then restarts
the stack with and without OTEL_EXPORTER_OTLP_ENDPOINT before each measurement. Prints a table
and writes benchmarks/results/tracing_overhead.json.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any

import httpx
import typer

from benchmarks.training_jobs_api import parse_wrk
from cluster.sandbox import OtlpSink, Stack, hermetic_stack, start, stop
from core.settings import REPO_ROOT, Settings
from serve_apps.schemas import EXAMPLE_ROW

RESULTS = REPO_ROOT / "benchmarks" / "results"
LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{body}'
"""


def _train(settings: Settings) -> str:
    from cluster.demo import wait_for_version
    from jobs.result import training_result
    from services.ray_submission import follow_job, submit_training

    job = submit_training(settings, "jobs/configs/adult.yaml", ["train.epochs=1", "train.patience=1"])
    status, logs = follow_job(settings, job)
    result = training_result(logs)
    if status != "SUCCEEDED" or result is None:
        raise SystemExit(f"training failed: {logs[-2000:]}")
    version = str(result["model_version"])
    if not wait_for_version(settings, version, 120):
        raise SystemExit("the model was not served")
    return version


def predict_load(stack: Stack) -> tuple[str, Path, str]:
    """A hermetic stack made ready for wrk: the predict URL straight to Serve, the wrk script
    posting one example row with the stack's key, and the version of a freshly trained model."""
    env = stack.env
    url = f"http://127.0.0.1:{env['SERVE_PORT']}/v1/predict"
    script = Path(env["STATE_DIR"]) / "predict.lua"
    script.write_text(LUA.format(key=stack.api_key, body=json.dumps({"instances": [EXAMPLE_ROW]})))
    return url, script, _train(stack.settings)


def _ready(url: str, key: str) -> None:
    from core.health import wait_until

    def serving() -> bool:
        try:
            body = {"instances": [EXAMPLE_ROW]}
            return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    if not wait_until(serving, 180):
        raise SystemExit("the predict endpoint did not come up")


def _measure(url: str, script: Path, connections: int, duration: int) -> dict[str, float]:
    subprocess.run(["wrk", "-t1", "-c4", "-d3s", "-s", str(script), url], check=True, capture_output=True)
    run = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
        check=True,
        capture_output=True,
        text=True,
    )
    return parse_wrk(run.stdout)


def main(connections: int = 16, duration: int = 20, rounds: int = 2) -> None:
    sink = OtlpSink().start()
    runs: list[dict[str, Any]] = []
    overrides = {"PROMETHEUS_ENABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    try:
        with hermetic_stack("bench_trace", overrides) as stack:
            env, key = stack.env, stack.api_key
            url, script, version = predict_load(stack)
            for _ in range(rounds):
                for tracing in (False, True):
                    stop(env)
                    round_env = {**env, "OTEL_EXPORTER_OTLP_ENDPOINT": sink.endpoint if tracing else ""}
                    start(round_env)
                    _ready(url, key)
                    spans_before = len(sink.spans)
                    figures = _measure(url, script, connections, duration)
                    figures.update({"tracing": tracing, "spans_received": len(sink.spans) - spans_before})
                    runs.append(figures)
                    typer.echo(
                        f"tracing {'on ' if tracing else 'off'}: {figures['rps']:.0f} req/s, "
                        f"p50 {figures['p50_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
                        f"{figures['non_2xx'] + figures['socket_errors']:.0f} errors, {figures['spans_received']} spans"
                    )
    finally:
        sink.stop()
    off = [r["rps"] for r in runs if not r["tracing"]]
    on = [r["rps"] for r in runs if r["tracing"]]
    summary = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model_version": version,
        "connections": connections,
        "duration_s": duration,
        "runs": runs,
        "rps_off_median": statistics.median(off),
        "rps_on_median": statistics.median(on),
        "overhead_pct": 100 * (1 - statistics.median(on) / statistics.median(off)),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tracing_overhead.json").write_text(json.dumps(summary, indent=2))
    typer.echo(
        f"median req/s: off {summary['rps_off_median']:.0f}, on {summary['rps_on_median']:.0f} "
        f"({summary['overhead_pct']:.1f}% lower with tracing on)"
    )


if __name__ == "__main__":
    typer.run(main)
