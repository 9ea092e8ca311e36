"""Submitting and following training jobs through the Ray Jobs API (the path of `ray job submit`):
the dispatcher, the demo and the tests all ship the code and follow the job the same way."""

from __future__ import annotations

import asyncio
import shlex
import subprocess
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from core.settings import REPO_ROOT, Settings

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

# Never ship local state, environments or caches to the cluster with the working dir.
WORKING_DIR_EXCLUDES = [
    ".venv/",
    ".state/",
    ".git/",
    "**/__pycache__/",
    ".mypy_cache/",
    ".ruff_cache/",
    ".pytest_cache/",
    "benchmarks/results/",
]


def local_git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def training_runtime_env(extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    env_vars = dict(extra_env or {})
    commit = local_git_commit()
    if commit:
        env_vars.setdefault("GIT_COMMIT", commit)
    return {"working_dir": str(REPO_ROOT), "excludes": WORKING_DIR_EXCLUDES, "env_vars": env_vars}


def jobs_client(settings: Settings) -> JobSubmissionClient:
    """A Jobs API client that presents the cluster's token when token authentication is on."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(settings.ray.dashboard_url, headers=settings.ray.auth_headers())


def submit_training(
    settings: Settings,
    config: str = "jobs/configs/adult.yaml",
    overrides: list[str] | None = None,
    submission_id: str | None = None,
    module: str = "jobs.train",
    env: dict[str, str] | None = None,
) -> str:
    """Submit a training (or tuning) job; `env` adds to the job's environment, e.g. MLFLOW_EXPERIMENT."""
    client = jobs_client(settings)
    # The entrypoint is a shell command: a value with spaces or quotes (a YAML mapping) stays one argument.
    args = " ".join(f"--set {shlex.quote(o)}" for o in overrides or [])
    entrypoint = f"python -m {module} --config {config} {args}".strip()
    return str(
        client.submit_job(entrypoint=entrypoint, runtime_env=training_runtime_env(env), submission_id=submission_id)
    )


def follow_job(settings: Settings, job_id: str, echo: Callable[[str], None] | None = None) -> tuple[str, str]:
    """Stream the job's logs until it ends; returns (final status, full logs)."""
    client = jobs_client(settings)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            if echo is not None:
                echo(chunk)

    asyncio.run(tail())
    return str(client.get_job_status(job_id).value), client.get_job_logs(job_id)
