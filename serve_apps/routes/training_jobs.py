"""Asynchronous training: requests are stored durably, then queued for the dispatcher."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Header, Query, Request, Response

from serve_apps.dependencies import API_KEY, ReplicaDep
from serve_apps.errors import JOB_RESPONSES, error_response
from services.training_jobs.models import JobDetail, JobList, JobRecord, JobSpec, JobState

router = APIRouter(tags=["training"], dependencies=[API_KEY], responses=JOB_RESPONSES)


@router.post("/v1/training-jobs", status_code=202, response_model=JobRecord)
async def create_training_job(
    spec: JobSpec,
    request: Request,
    response: Response,
    replica: ReplicaDep,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
) -> Any:
    """Queue a training (or tuning) job. Returns at once with the job's id; the job is stored
    durably before this returns. Reusing an idempotency key returns the original job."""
    jobs = await replica.training_jobs()
    if idempotency_key and not spec.idempotency_key:
        spec = spec.model_copy(update={"idempotency_key": idempotency_key})
    job, created = await jobs.submit(spec, request.state.traceparent)
    response.headers["Location"] = f"/v1/training-jobs/{job.id}"
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
    return job


@router.get("/v1/training-jobs/{job_id}", response_model=JobDetail)
async def get_training_job(job_id: UUID, request: Request, replica: ReplicaDep) -> Any:
    """A training job's state, attempts, Ray job, MLflow run, model version and history."""
    detail = await (await replica.training_jobs()).get(job_id)
    if detail is None:
        return error_response(request, 404, "not_found", f"no training job {job_id}")
    return detail


@router.get("/v1/training-jobs", response_model=JobList)
async def list_training_jobs(
    replica: ReplicaDep,
    state: JobState | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    before: datetime | None = None,
) -> Any:
    """Training jobs, newest first; page with `before`."""
    page = await (await replica.training_jobs()).list(state, limit, before)
    return JobList(jobs=page, next_before=page[-1].created_at if len(page) == limit else None)
