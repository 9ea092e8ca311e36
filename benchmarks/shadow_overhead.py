"""What a shadow challenger costs the clients: single-row `/v1/predict` with wrk, with a shadow
challenger loaded (every request mirrored to it) and with none, alternating.

    .venv/bin/python -m benchmarks.shadow_overhead [--connections 16] [--duration 20] [--rounds 3]

Starts its own stack (own ports, state dir, databases), trains two one-epoch Adult versions (the
second is not promoted), then for each round: no challenger (the `challenger` alias removed and the
rollout ended), then the second version as a shadow challenger (`jobs.promote --rollout shadow`,
its window made too long to end during the run), each measured once the replica shows the state.
The share of answered rows that the shadow scored comes from the recorded rows of each round
(the rest were dropped by the bounded mirror queue). Goal (issue 20): median throughput with a
shadow at least 0.85x, p99 at most 1.2x. Writes benchmarks/results/shadow_overhead.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
from typing import Any

import httpx
import psycopg
import typer
from mlflow.tracking import MlflowClient

from benchmarks.tracing_overhead import _measure, _ready, predict_load
from cluster.sandbox import Stack, hermetic_stack, run_cli
from core.health import wait_until
from core.settings import REPO_ROOT
from jobs.rollout import CHALLENGER_ALIAS

RESULTS = REPO_ROOT / "benchmarks" / "results"
# A shadow window that outlasts the run and a rule that never ends it early: the benchmark
# measures the mirror's cost, not a decision.
BENCH_ROLLOUT = {
    "ROLLOUT_REFRESH_S": "1",
    "ROLLOUT_WINDOW_REQUESTS": "1000000000",
    "ROLLOUT_WINDOW_S": "86400",
    "ROLLOUT_MIN_AGREEMENT": "0",
    "PROMETHEUS_ENABLED": "false",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "",
}


def _second_version(stack: Stack) -> str:
    from jobs.result import training_result
    from services.ray_submission import follow_job, submit_training

    overrides = ["train.epochs=1", "train.patience=1", "promotion.enabled=false"]
    job = submit_training(stack.settings, "jobs/configs/adult.yaml", overrides)
    status, logs = follow_job(stack.settings, job)
    result = training_result(logs)
    if status != "SUCCEEDED" or result is None:
        raise SystemExit(f"training failed: {logs[-2000:]}")
    return str(result["model_version"])


def _rollout(stack: Stack) -> dict[str, Any] | None:
    url = f"http://127.0.0.1:{stack.env['SERVE_PORT']}/v1/models/{stack.settings.model.name}"
    body = httpx.get(url, headers={"Authorization": f"Bearer {stack.api_key}"}, timeout=10).json()
    record: dict[str, Any] | None = (body.get("rollout") or {}).get("rollout")
    return record


def _no_challenger(stack: Stack, url: str) -> None:
    client = MlflowClient(stack.settings.mlflow.tracking_uri)
    with contextlib.suppress(Exception):
        client.delete_registered_model_alias(stack.settings.model.name, CHALLENGER_ALIAS)
    if not wait_until(lambda: (r := _rollout(stack)) is None or r["state"] != "active", 120):
        raise SystemExit("the rollout did not end after its challenger alias was removed")
    # The replicas follow within a poll interval: until then they still mirror.
    quiet = [0]

    def not_mirroring() -> bool:
        served, mirrored = _rows(stack)
        _ready(url, stack.api_key)
        wait_until(lambda: _rows(stack)[0] > served, 10, max_wait_s=0.2)
        quiet[0] = quiet[0] + 1 if _rows(stack)[1] == mirrored else 0
        return quiet[0] >= 3

    if not wait_until(not_mirroring, 120, max_wait_s=0.5):
        raise SystemExit("the replicas still mirror requests after the rollout ended")


def _shadow(stack: Stack, version: str, url: str) -> None:
    result = run_cli(
        "jobs.promote",
        "--model",
        stack.settings.model.name,
        "--version",
        version,
        "--rollout",
        "shadow",
        "--margin",
        "-1",
        env=stack.env,
        timeout=300,
    )
    if result.returncode != 0:
        raise SystemExit(f"the gate did not pass the challenger: {result.stdout}{result.stderr}")
    if not wait_until(lambda: (r := _rollout(stack)) is not None and r["state"] == "active", 120):
        raise SystemExit("the shadow rollout did not start")
    # Mirrored rows appear once a replica has loaded the challenger.
    before = _rows(stack)[1]

    def mirroring() -> bool:
        _ready(url, stack.api_key)
        return _rows(stack)[1] > before

    if not wait_until(mirroring, 120):
        raise SystemExit("no replica mirrors requests to the shadow")


def _rows(stack: Stack) -> tuple[int, int]:
    """Rows recorded so far: (served, mirrored)."""
    dsn = stack.settings.database.value()
    assert dsn is not None
    with psycopg.connect(dsn) as conn:
        served = conn.execute("SELECT count(*) FROM predictions").fetchone()
        mirrored = conn.execute("SELECT count(*) FROM shadow_predictions").fetchone()
    return int(served[0]) if served else 0, int(mirrored[0]) if mirrored else 0


def _recorded_since(stack: Stack, before: tuple[int, int]) -> tuple[int, int]:
    """Served and mirrored rows of a round, once the replicas' buffers reached the database."""
    counts = [before]

    def settled() -> bool:
        now = _rows(stack)
        settled_now = now == counts[-1]
        counts.append(now)
        return settled_now

    wait_until(settled, 30, max_wait_s=1.0)
    served, mirrored = counts[-1]
    return served - before[0], mirrored - before[1]


def run(connections: int = 16, duration: int = 20, rounds: int = 3) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    with hermetic_stack("bench_shadow", BENCH_ROLLOUT) as stack:
        url, script, champion = predict_load(stack)
        challenger = _second_version(stack)
        for _ in range(rounds):
            for shadow in (False, True):
                if shadow:
                    _shadow(stack, challenger, url)
                else:
                    _no_challenger(stack, url)
                _ready(url, stack.api_key)
                before = _rows(stack)
                figures: dict[str, Any] = dict(_measure(url, script, connections, duration))
                served, mirrored = _recorded_since(stack, before)
                figures.update(shadow=shadow, rows_served=served, rows_mirrored=mirrored)
                runs.append(figures)
                typer.echo(
                    f"shadow {'on ' if shadow else 'off'}: {figures['rps']:.0f} req/s, p99 {figures['p99_ms']:.1f} ms, "
                    f"{mirrored} of {served} rows mirrored"
                )
        _no_challenger(stack, url)
    return summarise(runs, champion, challenger, connections, duration)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(
    runs: list[dict[str, Any]], champion: str, challenger: str, connections: int, duration: int
) -> dict[str, Any]:
    off = [r for r in runs if not r["shadow"]]
    on = [r for r in runs if r["shadow"]]
    rps_off, rps_on = _spread([r["rps"] for r in off]), _spread([r["rps"] for r in on])
    p99_off, p99_on = _spread([r["p99_ms"] for r in off]), _spread([r["p99_ms"] for r in on])
    served = sum(r["rows_served"] for r in on)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "versions": {"champion": champion, "challenger": challenger},
        "connections": connections,
        "duration_s": duration,
        "settings": BENCH_ROLLOUT,
        "runs": runs,
        "rps_off": rps_off,
        "rps_on": rps_on,
        "p99_ms_off": p99_off,
        "p99_ms_on": p99_on,
        "throughput_ratio": rps_on["median"] / rps_off["median"],
        "p99_ratio": p99_on["median"] / p99_off["median"],
        "mirrored_share": sum(r["rows_mirrored"] for r in on) / served if served else None,
    }


def main(connections: int = 16, duration: int = 20, rounds: int = 3) -> None:
    summary = run(connections, duration, rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "shadow_overhead.json").write_text(json.dumps(summary, indent=2))
    typer.echo(
        f"median req/s: none {summary['rps_off']['median']:.0f} ({summary['rps_off']['min']:.0f}-"
        f"{summary['rps_off']['max']:.0f}), shadow {summary['rps_on']['median']:.0f} "
        f"({summary['rps_on']['min']:.0f}-{summary['rps_on']['max']:.0f}): {summary['throughput_ratio']:.2f}x; "
        f"median p99 {summary['p99_ms_off']['median']:.1f} -> {summary['p99_ms_on']['median']:.1f} ms: "
        f"{summary['p99_ratio']:.2f}x; {summary['mirrored_share'] or 0:.1%} of the rows mirrored"
    )


if __name__ == "__main__":
    typer.run(main)
