"""Asynchronous training: requests are stored durably, then queued for the dispatcher."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response

from core.keys import Principal
from serve_apps.dependencies import ReplicaDep, SingleValuedQuery, Trainer
from serve_apps.errors import JOB_RESPONSES, error_response
from services.training_jobs.models import JobDetail, JobList, JobRecord, JobSpec, JobState

router = APIRouter(tags=["training"], responses=JOB_RESPONSES)


@router.post("/v1/training-jobs", status_code=202, response_model=JobRecord)
async def create_training_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    replica: ReplicaDep,
    principal: Trainer,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Any:
    """Queue a training (or tuning) job. Returns at once with the job's id; the job is stored
    durably before this returns. Reusing an idempotency key returns the original job."""
    jobs = await replica.training_jobs()
    if idempotency_key and not spec.idempotency_key:
        spec = spec.model_copy(update={"idempotency_key": idempotency_key})
    job, created = await jobs.submit(
        spec, request.state.traceparent, actor=principal.actor(), operator=principal.admin, models=principal.models
    )
    if not created and not principal.admin and _owner(job) != principal.key_id:
        # Idempotency keys are one namespace: another key's job is neither shown nor replayed.
        message = "this idempotency key is already used by another client; choose another"
        detail = {"loc": ["header", "Idempotency-Key"], "msg": message, "type": "idempotency_conflict"}
        return error_response(request, 409, "idempotency_conflict", message, [detail])
    response.headers["Location"] = f"/v1/training-jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("/v1/training-jobs/{job_id}", response_model=JobDetail)
async def get_training_job(job_id: UUID, request: Request, replica: ReplicaDep, principal: Trainer) -> Any:
    """A training job's state, attempts, Ray job, MLflow run, model version and history: each
    event with who caused it. A key without `admin` sees only the jobs it started."""
    detail = await (await replica.training_jobs()).get(job_id, _owner_filter(principal))
    if detail is None:
        return error_response(request, 404, "not_found", f"no training job {job_id}")
    return detail


@router.get("/v1/training-jobs", response_model=JobList)
async def list_training_jobs(
    replica: ReplicaDep,
    principal: Trainer,
    _single: SingleValuedQuery,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: datetime | None = None,
) -> Any:
    """Training jobs, newest first; page with `before`. A key without `admin` lists only the jobs
    it started. Each query parameter is given at most once (a 422 otherwise)."""
    page = await (await replica.training_jobs()).list(state, limit, before, _owner_filter(principal))
    return JobList(jobs=page, next_before=page[-1].created_at if len(page) == limit else None)


@router.delete("/v1/training-jobs/{job_id}", response_model=JobRecord)
async def cancel_training_job(job_id: UUID, replica: ReplicaDep, principal: Trainer) -> Any:
    """Cancel a job: a queued one never starts, a running one's Ray job is stopped; its state
    becomes `cancelled` at once, with an event naming who cancelled it. Cancelling a cancelled job
    returns it again; a job that already ended otherwise is a 409 `job_finished`."""
    return await (await replica.training_jobs()).cancel(job_id, principal.actor(), _owner_filter(principal))


def _owner_filter(principal: Principal) -> str | None:
    """Whose jobs the key may see and cancel: its own, or every job for an admin (None)."""
    return None if principal.admin else principal.key_id


def _owner(job: JobRecord) -> str | None:
    return job.created_by.key_id if job.created_by is not None else None
