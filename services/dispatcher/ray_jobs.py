"""The Ray Jobs API as the dispatcher needs it: idempotent submission and stop, status, and logs.

The SDK client is synchronous and connects in its constructor, so every call runs in a thread
with a fresh client; a head that is down or restarting shows up as RayUnavailableError.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import requests

from core.audit import Actor
from core.settings import REPO_ROOT
from jobs.result import RESULT_MARKER
from services.ray_submission import training_runtime_env
from services.training_jobs.models import JobSpec

T = TypeVar("T")
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
CALL_TIMEOUT_S = 120.0


class RayUnavailableError(Exception):
    """The Jobs API could not be reached; worth retrying."""


class RayRejectedError(Exception):
    """The Jobs API refused the submission itself (not a transient condition)."""


@dataclass(frozen=True)
class RayJobStatus:
    status: str
    message: str

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES


def _not_found(exc: RuntimeError) -> bool:
    return "status code 404" in str(exc) or "does not exist" in str(exc)


def job_environment(job_id: UUID, traceparent: str | None, creator: Actor | None) -> dict[str, str]:
    """What the Ray job reads from its environment through Settings: its record's id, the trace it
    continues, and who started it (TRACEPARENT and AUDIT_ACTOR are settings.traceparent and
    settings.audit_actor there)."""
    env = {"TRAINING_JOB_ID": str(job_id)}
    if traceparent:
        env["TRACEPARENT"] = traceparent
    if creator is not None:
        env["AUDIT_ACTOR"] = creator.to_json()
    return env


def entrypoint(spec: JobSpec) -> str:
    """The job's command line: its module, its config file (relative to the working dir Ray ships,
    the repository's copy), and every override as `--set key=value`."""
    args = " ".join(f"--set {shlex.quote(o)}" for o in spec.cli_overrides())
    config = spec.config_path.relative_to(REPO_ROOT).as_posix()
    return f"python -m {spec.module} --config {config} {args}".strip()


class RayJobs:
    def __init__(self, dashboard_url: str, headers: dict[str, str] | None = None) -> None:
        self._url = dashboard_url
        self._headers = headers or {}

    async def _call(self, fn: Callable[[Any], T]) -> T:
        def run() -> T:
            from ray.job_submission import JobSubmissionClient

            try:
                client = JobSubmissionClient(self._url, headers=self._headers)
                return fn(client)
            except (ConnectionError, requests.exceptions.RequestException) as exc:
                raise RayUnavailableError(f"Ray Jobs API at {self._url} unreachable: {exc}") from exc
            except RuntimeError as exc:
                # The SDK reports HTTP errors as RuntimeError("Request failed with status code N").
                if re.search(r"status code (5\d\d)", str(exc)):
                    raise RayUnavailableError(str(exc)) from exc
                raise

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), CALL_TIMEOUT_S)
        except TimeoutError as exc:
            raise RayUnavailableError(f"Ray Jobs API at {self._url} did not answer in {CALL_TIMEOUT_S:.0f}s") from exc

    async def status(self, submission_id: str) -> RayJobStatus | None:
        """The job's status, or None when Ray has never heard of it."""

        def get(client: Any) -> RayJobStatus | None:
            try:
                info = client.get_job_info(submission_id)
            except RuntimeError as exc:
                if _not_found(exc):
                    return None
                raise
            return RayJobStatus(str(info.status.value), str(info.message or ""))

        return await self._call(get)

    async def ensure_submitted(
        self,
        submission_id: str,
        spec: JobSpec,
        job_id: UUID,
        traceparent: str | None,
        creator: Actor | None = None,
    ) -> RayJobStatus:
        """Submit under a deterministic id unless Ray already has that job: a redelivered message,
        a restarted dispatcher or a second dispatcher never starts the attempt twice. `creator`
        (who started the training job) travels in the job's environment as AUDIT_ACTOR."""
        existing = await self.status(submission_id)
        if existing is not None:
            return existing
        env = job_environment(job_id, traceparent, creator)

        def submit(client: Any) -> None:
            try:
                client.submit_job(
                    entrypoint=entrypoint(spec),
                    submission_id=submission_id,
                    runtime_env=training_runtime_env(env),
                    metadata={"training_job_id": str(job_id), "kind": spec.kind},
                )
            except RuntimeError as exc:
                if "already exists" in str(exc):
                    return  # another dispatcher submitted it a moment ago
                if "status code 4" in str(exc):
                    raise RayRejectedError(str(exc)) from exc
                raise

        await self._call(submit)
        return await self.status(submission_id) or RayJobStatus("PENDING", "")

    async def stop(self, submission_id: str) -> bool:
        """Ask Ray to stop the job (SIGTERM, then SIGKILL after Ray's grace period). Safe to repeat:
        False when it had already ended or Ray has never heard of it."""

        def stop(client: Any) -> bool:
            try:
                return bool(client.stop_job(submission_id))
            except RuntimeError as exc:
                if _not_found(exc):
                    return False
                raise

        return await self._call(stop)

    async def logs(self, submission_id: str) -> str:
        return str(await self._call(lambda client: client.get_job_logs(submission_id)))


def error_summary(logs: str, message: str, max_chars: int = 2000) -> str:
    """The part of a failed job's output a user needs: the exception line(s), not the whole log."""
    lines = [line for line in logs.splitlines() if line.strip() and not line.startswith(RESULT_MARKER)]
    errors = [line for line in lines if re.match(r"^\s*[\w.]+(Error|Exception|Exit|Interrupt)\b", line)]
    tail = errors[-1:] if errors else lines[-5:]
    text = " | ".join(s.strip() for s in [message, *tail] if s.strip())
    return text[-max_chars:] or "Ray job failed without output"
