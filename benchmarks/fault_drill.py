"""Fault drill against the running stack: accepted vs completed training jobs.

    .venv/bin/python -m benchmarks.fault_drill [--jobs 6]

Queues short training jobs through `POST /v1/training-jobs` while it SIGKILLs the dispatcher
holding a request (then restarts it with `cluster up`), stops and starts RabbitMQ's app, and
restarts PostgreSQL. Then it waits for every accepted job and counts outcomes, attempts and Ray
jobs per attempt. Needs root on a machine where RabbitMQ and PostgreSQL run locally.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import typer

from core.health import wait_until
from core.settings import REPO_ROOT, Settings, get_settings
from services.ray_submission import jobs_client

TERMINAL = {"succeeded", "failed", "dead_lettered"}
QUICK = {"train.epochs": 1, "train.patience": 1, "promotion.enabled": False}


class Drill:
    def __init__(self, settings: Settings) -> None:
        keys = settings.api.key_list()
        if not settings.training_jobs_enabled or not keys:
            raise SystemExit("the stack needs API_KEYS, DATABASE_URL and AMQP_URL (run `make demo` first)")
        self.settings = settings
        self.headers = {"Authorization": f"Bearer {keys[0]}"}
        self.run = uuid.uuid4().hex[:8]
        self.accepted: list[str] = []
        self.refused = 0

    def submit(self, count: int, phase: str) -> None:
        for index in range(count):
            response = httpx.post(
                f"{self.settings.serve.url}/v1/training-jobs",
                json={"overrides": QUICK},
                headers={**self.headers, "Idempotency-Key": f"drill-{self.run}-{phase}-{index}"},
                timeout=30,
            )
            if response.status_code == 202:
                self.accepted.append(response.json()["id"])
            else:
                self.refused += 1
            typer.echo(f"  {phase}: POST -> {response.status_code}")

    def job(self, job_id: str) -> dict[str, Any]:
        response = httpx.get(f"{self.settings.serve.url}/v1/training-jobs/{job_id}", headers=self.headers, timeout=30)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def any_running(self) -> bool:
        return any(self.job(j)["state"] == "running" for j in self.accepted)

    def kill_dispatcher(self) -> None:
        pid = int((self.settings.state_dir / "pids" / "dispatcher.pid").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        typer.echo(f"  SIGKILL dispatcher {pid}; restarting it with `cluster up`")
        result = subprocess.run([sys.executable, "-m", "cluster", "up"], cwd=REPO_ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr)

    def wait_all(self, timeout_s: float) -> list[dict[str, Any]]:
        def finished() -> bool:
            try:
                return all(self.job(j)["state"] in TERMINAL for j in self.accepted)
            except httpx.HTTPError:
                return False

        wait_until(finished, timeout_s, max_wait_s=10)
        return [self.job(j) for j in self.accepted]


def _run(*argv: str) -> None:
    typer.echo(f"  $ {' '.join(argv)}")
    subprocess.run(argv, check=True, capture_output=True, timeout=300)


def main(jobs: int = 6, timeout_s: float = 3600) -> None:
    settings = get_settings()
    drill = Drill(settings)
    per_phase = max(1, jobs // 3)
    typer.echo("phase 1: queue jobs, kill the dispatcher while it holds one")
    drill.submit(per_phase, "before")
    if not wait_until(drill.any_running, 600):
        raise SystemExit("no job started running within 600 s")
    drill.kill_dispatcher()
    typer.echo("phase 2: RabbitMQ down while requests arrive")
    _run("rabbitmqctl", "stop_app")
    try:
        drill.submit(per_phase, "broker-down")
    finally:
        _run("rabbitmqctl", "start_app")
    typer.echo("phase 3: PostgreSQL restart, then more requests")
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    _run("pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart")
    drill.submit(jobs - 2 * per_phase, "after-db-restart")
    typer.echo(f"waiting for {len(drill.accepted)} accepted jobs")
    started = time.monotonic()
    results = drill.wait_all(timeout_s)
    ray_jobs = Counter((j.metadata or {}).get("training_job_id") for j in jobs_client(settings).list_jobs())
    states = Counter(r["state"] for r in results)
    extra_ray_jobs = sum(max(0, ray_jobs[r["id"]] - r["attempts"]) for r in results)
    versions = {r["model_version"] for r in results if r["model_version"]}
    typer.echo(
        f"accepted {len(drill.accepted)}, refused {drill.refused}; completed: {dict(states)}; "
        f"attempts: {dict(Counter(r['attempts'] for r in results))}; "
        f"Ray jobs beyond one per attempt: {extra_ray_jobs}; distinct model versions: {len(versions)}; "
        f"waited {time.monotonic() - started:.0f} s"
    )
    if states.get("succeeded", 0) != len(drill.accepted) or extra_ray_jobs or len(versions) != len(drill.accepted):
        raise SystemExit(1)


if __name__ == "__main__":
    typer.run(main)
