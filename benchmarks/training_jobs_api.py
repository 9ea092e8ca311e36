"""Latency of `POST /v1/training-jobs` under concurrent clients, measured with wrk.

    .venv/bin/python -m benchmarks.training_jobs_api [--connections 16] [--duration 30]

Starts its own stack (own ports, state dir, job database and queues), stops its dispatcher so the
accepted jobs stay queued instead of training, drives the endpoint with wrk, then checks that every
202 left exactly one job row and one message on the queue. Everything is removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
from pathlib import Path

import aio_pika
import psycopg
import typer

from cluster.sandbox import AMQP_URL, hermetic_stack

LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
wrk.body = '{{"kind": "train", "config": "adult", "overrides": {{"train.epochs": 3}}}}'
"""


def _queue_depth(queue: str) -> int:
    async def depth() -> int:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            declared = await channel.get_queue(queue, ensure=True)
            return int(declared.declaration_result.message_count or 0)

    return asyncio.run(depth())


def _settle(dsn: str) -> None:
    """Wait until the last requests wrk gave up on are committed and published (a job is marked
    published only after the broker confirmed its message), so every count is final."""
    from core.health import wait_until

    def count() -> tuple[int, int]:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*), count(published_at) FROM training_jobs").fetchone()
            return (int(row[0]), int(row[1])) if row else (0, 0)

    seen = [count()]

    def stable() -> bool:
        seen.append(count())
        return seen[-1] == seen[-2] and seen[-1][0] == seen[-1][1]

    wait_until(stable, 10, max_wait_s=0.5)


def parse_wrk(output: str) -> dict[str, float]:
    def latency_ms(label: str) -> float:
        match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", output, re.M)
        if match is None:
            raise ValueError(f"no {label}% latency in wrk output:\n{output}")
        value, unit = float(match.group(1)), match.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    total = int(re.search(r"(\d+) requests in", output).group(1))  # type: ignore[union-attr]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    return {
        "p50_ms": latency_ms("50"),
        "p90_ms": latency_ms("90"),
        "p99_ms": latency_ms("99"),
        "requests": total,
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": sum(int(g) for g in errors.groups()) if errors else 0,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1)),  # type: ignore[union-attr]
    }


def main(connections: int = 16, duration: int = 30, threads: int = 2) -> None:
    with hermetic_stack("bench_jobs") as stack:
        env = stack.env
        state = Path(env["STATE_DIR"])
        pid = int((state / "pids" / "dispatcher.pid").read_text())
        os.kill(pid, signal.SIGTERM)  # accept only; nothing trains during the measurement
        script = state / "post.lua"
        script.write_text(LUA.format(key=stack.api_key))
        url = f"http://127.0.0.1:{env['SERVE_PORT']}/v1/training-jobs"
        subprocess.run(["wrk", "-t1", "-c4", "-d3s", "-s", str(script), url], check=True, capture_output=True)
        _settle(env["DATABASE_URL"])
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            warmup = conn.execute("SELECT count(*) FROM training_jobs").fetchone()[0]  # type: ignore[index]
        run = subprocess.run(
            ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", "-s", str(script), url],
            check=True,
            capture_output=True,
            text=True,
        )
        figures = parse_wrk(run.stdout)
        _settle(env["DATABASE_URL"])
        # The same path with no work behind it: what the Serve proxy and ingress cost alone.
        baseline = subprocess.run(
            [
                "wrk",
                f"-t{threads}",
                f"-c{connections}",
                f"-d{min(duration, 10)}s",
                "--latency",
                url.replace("/v1/training-jobs", "/healthz"),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        base = parse_wrk(baseline.stdout)
        typer.echo(
            f"baseline GET /healthz, {connections} connections: p50 {base['p50_ms']:.1f} ms, "
            f"p99 {base['p99_ms']:.1f} ms, {base['rps']:.0f} req/s"
        )
        accepted = int(figures["requests"] - figures["non_2xx"] - figures["socket_errors"])
        with psycopg.connect(env["DATABASE_URL"]) as conn:
            rows = conn.execute("SELECT count(*) FROM training_jobs").fetchone()[0] - warmup  # type: ignore[index]
        messages = _queue_depth(env["TRAINING_QUEUE"]) - warmup
        typer.echo(run.stdout)
        typer.echo(
            f"POST /v1/training-jobs, {connections} connections, {duration}s: "
            f"p50 {figures['p50_ms']:.1f} ms, p90 {figures['p90_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms, "
            f"{figures['rps']:.0f} req/s; {accepted} accepted, {rows} job rows, {messages} queued messages, "
            f"{figures['non_2xx']} non-2xx, {figures['socket_errors']} socket errors"
        )
        # wrk stops counting with up to one request per connection still in flight; those
        # complete on the server, so rows may exceed wrk's count by at most `connections`.
        if rows != messages or not accepted <= rows <= accepted + connections:
            raise SystemExit("accepted, stored and queued counts differ")


if __name__ == "__main__":
    typer.run(main)
