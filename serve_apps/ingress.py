"""The HTTP front door: auth, validation, request ids, error mapping. Holds no model."""

import asyncio
import logging
import uuid
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from cluster import tracecontext
from cluster.settings import get_settings
from jobs.training_jobs.models import InvalidJobSpecError, JobDetail, JobList, JobRecord, JobSpec, JobState
from jobs.training_jobs.service import TrainingJobs
from jobs.training_jobs.store import TRANSIENT_DB_ERRORS, IdempotencyConflictError
from serve_apps.auth import KeyStore, require_api_key
from serve_apps.schemas import CurrentModel, ErrorResponse, PredictRequest, PredictResponse

log = logging.getLogger(__name__)
REQUEST_ID_HEADER = "X-Request-ID"
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "invalid request; details name each field"},
    503: {"model": ErrorResponse, "description": "no model loaded yet"},
}
_JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "no such training job"},
    409: {"model": ErrorResponse, "description": "idempotency key already used for a different job spec"},
    422: {"model": ErrorResponse, "description": "invalid job spec; details name the field"},
    503: {"model": ErrorResponse, "description": "asynchronous training disabled, or the job store is unreachable"},
}


def request_id_of(request: Request) -> str:
    existing: str | None = getattr(request.state, "request_id", None)
    if existing:
        return existing
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    # Accept a caller's id only when it is short and printable, so it is safe to log and echo.
    rid = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else uuid.uuid4().hex
    request.state.request_id = rid
    return rid


def error_response(
    request: Request, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    rid = request_id_of(request)
    body: dict[str, Any] = {"code": code, "message": message, "request_id": rid}
    if details is not None:
        body["details"] = details
    # Serve's proxy echoes the request id in the X-Request-ID response header; the body carries it too.
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return error_response(
        request,
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=dict(exc.headers) if exc.headers else None,
    )


def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")} for e in exc.errors()]
    fields = ", ".join(".".join(str(p) for p in d["loc"]) for d in details[:5])
    message = f"invalid request: {fields}"
    if any(d["loc"] == ["body"] for d in details):
        message += " (send a JSON object with Content-Type: application/json)"
    return error_response(request, 422, "validation_error", message, details)


api = FastAPI(
    title="Ray cluster inference API",
    version="1.0.0",
    description="Predictions from the champion model, served by Ray Serve. Authenticate with "
    "`Authorization: Bearer <key>` or `X-API-Key: <key>`.",
)


class TrainingJobsDisabledError(Exception):
    pass


def _training_jobs_disabled(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        request,
        503,
        "training_jobs_disabled",
        "asynchronous training is not configured: set DATABASE_URL and AMQP_URL for the cluster",
    )


def _invalid_job_spec(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InvalidJobSpecError)
    details = [{"loc": exc.loc, "msg": exc.message, "type": "value_error"}]
    return error_response(request, 422, "validation_error", exc.message, details)


def _idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IdempotencyConflictError)
    return error_response(request, 409, "idempotency_conflict", str(exc), [{"existing_job_id": str(exc.existing.id)}])


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("job store unavailable: %s", exc)
    return error_response(
        request,
        503,
        "job_store_unavailable",
        "the training job store (PostgreSQL) is unreachable; nothing was accepted, retry later",
        headers={"Retry-After": "5"},
    )


api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(RequestValidationError, _validation_error)
api.add_exception_handler(TrainingJobsDisabledError, _training_jobs_disabled)
api.add_exception_handler(InvalidJobSpecError, _invalid_job_spec)
api.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)
for _error in TRANSIENT_DB_ERRORS:
    api.add_exception_handler(_error, _store_unavailable)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    def __init__(self, model: DeploymentHandle[Any], key_hashes: list[str], max_rows: int) -> None:
        self._model = model
        self._max_rows = max_rows
        api.state.key_store = KeyStore(key_hashes)
        self._jobs: TrainingJobs | None = None
        self._jobs_lock = asyncio.Lock()

    async def _training_jobs(self) -> TrainingJobs:
        """Connect on first use, so the inference API starts and serves without PostgreSQL or
        RabbitMQ. Errors map to responses through the app's exception handlers."""
        settings = get_settings()
        if not settings.training_jobs_enabled:
            raise TrainingJobsDisabledError
        async with self._jobs_lock:
            if self._jobs is None:
                jobs = TrainingJobs.from_settings(settings, name=f"inference-api {uuid.uuid4().hex[:8]}")
                try:
                    await jobs.start()
                except BaseException:
                    await jobs.close()  # the next request starts afresh; no pool left behind
                    raise
                self._jobs = jobs
        return self._jobs

    @api.get("/healthz", tags=["health"])
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers. No authentication."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}})
    async def readyz(self, request: Request) -> Any:
        """Readiness: 200 once a model is loaded and can answer, 503 before."""
        status = await self._model.status.remote()
        if not status["ready"]:
            return error_response(
                request,
                503,
                "not_ready",
                "no model loaded yet",
                details=[{"msg": status["last_error"] or "waiting for a champion"}],
            )
        return {"status": "ready", "model": status["model"]}

    @api.post(
        "/v1/predict",
        tags=["inference"],
        response_model=PredictResponse,
        response_model_exclude_none=True,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def predict(self, body: PredictRequest, request: Request) -> Any:
        """Predict a label and its probability for each instance."""
        if len(body.instances) > self._max_rows:
            return error_response(
                request,
                422,
                "validation_error",
                f"instances: at most {self._max_rows} per request",
                [
                    {
                        "loc": ["body", "instances"],
                        "msg": f"at most {self._max_rows} instances per request, got {len(body.instances)}",
                        "type": "too_long",
                    }
                ],
            )
        result = await self._model.predict.remote(body.instances)
        status = result.get("status", 500)
        if status != 200:
            code = "validation_error" if status == 422 else "not_ready"
            return error_response(request, status, code, result.get("message", "error"), result.get("details"))
        return {"request_id": request_id_of(request), "model": result["model"], "predictions": result["predictions"]}

    @api.get(
        "/v1/models/current",
        tags=["models"],
        response_model=CurrentModel,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def current_model(self, request: Request) -> Any:
        """The model version being served, its schema and test metrics."""
        current = await self._model.current.remote()
        if current is None:
            return error_response(request, 503, "not_ready", "no model loaded yet")
        return current

    @api.post(
        "/v1/training-jobs",
        tags=["training"],
        status_code=202,
        response_model=JobRecord,
        responses=_JOB_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def create_training_job(
        self,
        spec: JobSpec,
        request: Request,
        response: Response,
        idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=200)] = None,
    ) -> Any:
        """Queue a training (or tuning) job. Returns at once with the job's id; the job is stored
        durably before this returns. Reusing an idempotency key returns the original job."""
        jobs = await self._training_jobs()
        if idempotency_key and not spec.idempotency_key:
            spec = spec.model_copy(update={"idempotency_key": idempotency_key})
        job, created = await jobs.submit(spec, tracecontext.child_of(request.headers.get("traceparent")))
        response.headers["Location"] = f"/v1/training-jobs/{job.id}"
        if not created:
            response.headers["Idempotent-Replayed"] = "true"
        return job

    @api.get(
        "/v1/training-jobs/{job_id}",
        tags=["training"],
        response_model=JobDetail,
        responses=_JOB_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def get_training_job(self, job_id: UUID, request: Request) -> Any:
        """A training job's state, attempts, Ray job, MLflow run, model version and history."""
        detail = await (await self._training_jobs()).get(job_id)
        if detail is None:
            return error_response(request, 404, "not_found", f"no training job {job_id}")
        return detail

    @api.get(
        "/v1/training-jobs",
        tags=["training"],
        response_model=JobList,
        responses=_JOB_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def list_training_jobs(
        self,
        request: Request,
        state: JobState | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 50,
        before: datetime | None = None,
    ) -> Any:
        """Training jobs, newest first; page with `before`."""
        page = await (await self._training_jobs()).list(state, limit, before)
        return JobList(jobs=page, next_before=page[-1].created_at if len(page) == limit else None)
