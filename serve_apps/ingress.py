"""The HTTP front door and the model behind it: auth, validation, request ids, error mapping,
and the champion model, batched across requests with `@serve.batch` inside this replica."""

import asyncio
import json
import logging
import logging.handlers
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import trace
from psycopg_pool import PoolTimeout
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.database import TRANSIENT_DB_ERRORS
from core.keys import KeyStore, start_key_refresher
from core.logs import add_context_filter
from core.settings import get_settings
from serve_apps.auth import require_alert_token, require_api_key
from serve_apps.champion import BatchResult, ChampionModel
from serve_apps.context import RequestContextMiddleware, request_id_from
from serve_apps.metrics import IngressMetrics
from serve_apps.schemas import (
    AlertmanagerPayload,
    AlertWebhookResponse,
    CurrentModel,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    PredictRequest,
    PredictResponse,
    RetrainRequest,
)
from services.feedback.recorder import PredictionRecorder
from services.feedback.store import FeedbackOutcome, FeedbackStore, PredictionRow
from services.training_jobs.models import InvalidJobSpecError, JobDetail, JobList, JobRecord, JobSpec, JobState
from services.training_jobs.service import TrainingJobs
from services.training_jobs.store import IdempotencyConflictError

# Serve's replica logger: its JSON handler writes the replica's log file.
log = logging.getLogger("ray.serve")
# Answered by Nginx in front of every route, in the same error shape.
_EDGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "request body larger than the edge accepts"},
    429: {"model": ErrorResponse, "description": "rate limited at the edge; retry after Retry-After seconds"},
}
_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    422: {"model": ErrorResponse, "description": "invalid request; details name each field"},
    503: {"model": ErrorResponse, "description": "no model loaded yet"},
    **_EDGE_RESPONSES,
}
_JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "no such training job"},
    409: {"model": ErrorResponse, "description": "idempotency key already used for a different job spec"},
    422: {"model": ErrorResponse, "description": "invalid job spec; details name the field"},
    503: {"model": ErrorResponse, "description": "asynchronous training disabled, or the job store is unreachable"},
    **_EDGE_RESPONSES,
}


def request_id_of(request: Request) -> str:
    existing: str | None = getattr(request.state, "request_id", None)
    if existing:
        return existing
    rid = request_id_from(request.headers.get("X-Request-ID"))
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
    return _ErrorJSONResponse({"error": body}, status_code=status, headers=headers)


class _ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: error details echo the caller's field names, and a lone surrogate
    (valid as a JSON escape, invalid in UTF-8) must not turn a 422 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


# Why FastAPI could not read a body (it answers a bare 400 "error parsing the body" for these).
_UNREADABLE_BODY: dict[type[Exception], str] = {
    RecursionError: "JSON nested too deeply",
    UnicodeDecodeError: "not UTF-8 text",
    ValueError: "a number too long",  # Python's limit on the digits of an integer
}


def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # A body that is not valid JSON is a validation error like any other (documented as 422).
        reason = next((r for kind, r in _UNREADABLE_BODY.items() if isinstance(exc.__cause__, kind)), "not JSON")
        message = f"invalid request: body: {reason} (send a JSON object with Content-Type: application/json)"
        details = [{"loc": ["body"], "msg": reason, "type": "json_invalid"}]
        return error_response(request, 422, "validation_error", message, details)
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
    message = f"invalid request: {fields}: {details[0]['msg']}" if details else "invalid request"
    if any(d["loc"] == ["body"] or d["type"] == "json_invalid" for d in details):
        # FastAPI's loc for a JSON syntax error is ["body", <character offset>].
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


class FeedbackDisabledError(Exception):
    pass


def _feedback_disabled(request: Request, exc: Exception) -> JSONResponse:
    return error_response(
        request, 503, "feedback_disabled", "feedback is not configured: set DATABASE_URL for the cluster"
    )


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
    log.warning("database unavailable: %s", exc)
    store = "feedback" if request.url.path.startswith("/v1/feedback") else "training job"
    return error_response(
        request,
        503,
        f"{store.replace(' ', '_')}_store_unavailable",
        f"the {store} store (PostgreSQL) is unreachable; nothing was accepted, retry later",
        headers={"Retry-After": "5"},
    )


api.add_exception_handler(StarletteHTTPException, _http_error)
api.add_exception_handler(RequestValidationError, _validation_error)
api.add_exception_handler(TrainingJobsDisabledError, _training_jobs_disabled)
api.add_exception_handler(FeedbackDisabledError, _feedback_disabled)
api.add_exception_handler(InvalidJobSpecError, _invalid_job_spec)
api.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)
for _error in TRANSIENT_DB_ERRORS:
    api.add_exception_handler(_error, _store_unavailable)
api.add_middleware(RequestContextMiddleware)

_FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": FeedbackResponse, "description": "a label was already given for this row; the first one stays"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "no prediction with this request id and index"},
    422: {"model": ErrorResponse, "description": "invalid body, unknown label, or the prediction is too old"},
    503: {"model": ErrorResponse, "description": "feedback disabled, no model loaded, or the database is unreachable"},
    **_EDGE_RESPONSES,
}


# Serve's throughput profile buffers the replica's log records (SERVE_ACCESS_LOG_BUFFER_LINES)
# and writes them only when the buffer is full: without this, a quiet replica's lines would wait
# for the fiftieth request. Flushing once a second bounds the delay and keeps the batching.
LOG_FLUSH_INTERVAL_S = 1.0


async def flush_serve_logs(interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        for handler in logging.getLogger("ray.serve").handlers:
            if isinstance(handler, logging.handlers.MemoryHandler):
                handler.flush()


@dataclass(frozen=True)
class ModelOptions:
    """Which registered model the replica serves and how it batches requests."""

    model_name: str
    alias: str
    tracking_uri: str
    poll_interval_s: float = 5.0
    max_batch_size: int = 64
    batch_wait_timeout_s: float = 0.0
    torch_threads: int = 1


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(api)
class Ingress:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self,
        model: ModelOptions,
        key_hashes: list[str],
        max_rows: int,
        alert_token_hashes: list[str] | None = None,
    ) -> None:
        import torch

        # One intra-op thread: the replica's event loop is the unit of parallelism, and more
        # threads than the replica's CPU share only contend (measured in benchmarks/).
        torch.set_num_threads(model.torch_threads)
        self._max_rows = max_rows
        api.state.key_store = KeyStore(key_hashes)
        api.state.alert_token_store = KeyStore(alert_token_hashes) if alert_token_hashes else None
        add_context_filter("ray.serve", "inference-api")
        # Keys added or revoked with `python -m cluster keys` take effect without a restart.
        settings = get_settings()
        database_url = settings.database.url.get_secret_value() if settings.database.url else None
        self._key_refresher = await start_key_refresher(
            api.state.key_store, key_hashes, database_url, settings.api.key_refresh_s
        )
        self._metrics = IngressMetrics()
        self._jobs: TrainingJobs | None = None
        self._jobs_lock = asyncio.Lock()
        self._recorder: PredictionRecorder | None = None
        self._predict_batch.set_max_batch_size(model.max_batch_size)  # type: ignore[attr-defined]
        self._predict_batch.set_batch_wait_timeout_s(model.batch_wait_timeout_s)  # type: ignore[attr-defined]
        self._tracer = trace.get_tracer("serve_apps.ingress")
        self._champion = ChampionModel(model.model_name, model.alias, model.tracking_uri, model.poll_interval_s)
        await self._champion.start()
        self._log_flusher = asyncio.get_running_loop().create_task(flush_serve_logs(LOG_FLUSH_INTERVAL_S))

    def _prediction_recorder(self) -> PredictionRecorder | None:
        """Created on first use in the serving loop; connects and migrates in the background so
        that predictions never wait on PostgreSQL."""
        settings = get_settings()
        if settings.database.url is None:
            return None
        if self._recorder is None:
            store = FeedbackStore(settings.database.url.get_secret_value())
            self._recorder = PredictionRecorder(
                store,
                settings.prediction.flush_interval_s,
                settings.prediction.buffer_rows,
                on_dropped=lambda n: self._metrics.records_dropped.inc(n),
            )
            self._recorder.start()
        return self._recorder

    async def __del__(self) -> None:
        """Serve's graceful shutdown: buffered prediction rows reach PostgreSQL before the replica
        goes (a scale-down or redeploy loses none), pools close."""
        self._champion.stop()
        self._log_flusher.cancel()
        if self._key_refresher is not None:
            await self._key_refresher.stop()
        if self._recorder is not None:
            try:
                await asyncio.wait_for(self._recorder.close(), 10)
            except Exception as exc:
                log.warning("prediction rows not flushed at shutdown: %s", exc)
        if self._jobs is not None:
            await self._jobs.close()

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

    @api.get("/healthz", tags=["health"], responses=_EDGE_RESPONSES)
    async def healthz(self) -> dict[str, str]:
        """Liveness: the ingress answers. No authentication."""
        return {"status": "ok"}

    @api.get("/readyz", tags=["health"], responses={503: {"model": ErrorResponse}, **_EDGE_RESPONSES})
    async def readyz(self, request: Request) -> Any:
        """Readiness: 200 once a model is loaded and can answer, 503 before."""
        status = self._champion.status()
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
        model = self._champion.loaded
        if model is None:
            return error_response(request, 503, "not_ready", f"no {self._champion.alias} model is loaded yet")
        errors = model.validator.validate(body.instances)
        if errors:
            fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in errors[:5])
            return error_response(request, 422, "validation_error", f"invalid instances: {fields}", errors)
        self._metrics.request_rows.observe(len(body.instances), tags={"route": "/v1/predict"})
        # A child span for the model's share of the request (a no-op without Serve's tracing).
        with self._tracer.start_as_current_span("model.predict") as span:
            result: BatchResult = await self._predict_batch(body.instances)
            served = result.model
            span.set_attribute("model.version", served.version)
            span.set_attribute("model.rows", len(body.instances))
        trace.get_current_span().set_attribute("model.version", served.version)
        rid = request_id_of(request)
        recorder = self._prediction_recorder()
        if recorder is not None:
            recorder.record(
                [
                    PredictionRow(rid, i, served.name, served.version, p.get("label"), p.get("probability"), instance)
                    for i, (instance, p) in enumerate(zip(body.instances, result.predictions, strict=True))
                ]
            )
        # Serialised once with orjson, bypassing FastAPI's response-model validation: the body is
        # built here from typed values, and on a 1,000-row answer re-validating costs milliseconds.
        return Response(
            orjson.dumps({"request_id": rid, "model": served.ref, "predictions": result.predictions}),
            media_type="application/json",
        )

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def _predict_batch(self, requests: list[list[dict[str, Any]]]) -> list[BatchResult]:
        # Runs on the replica's event loop: the model call takes well under a millisecond per
        # batch of single rows, less than a hand-off to a thread would.
        return self._champion.predict(requests)

    @api.post(
        "/v1/feedback",
        tags=["inference"],
        status_code=201,
        response_model=FeedbackResponse,
        responses=_FEEDBACK_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def feedback(self, body: FeedbackRequest, request: Request, response: Response) -> Any:
        """The true label of one predicted instance (`request_id` and `index` from /v1/predict).
        Counts towards the live accuracy of the version that made the prediction; repeats are
        ignored (200, the first label stays)."""
        recorder = self._prediction_recorder()
        if recorder is None:
            raise FeedbackDisabledError
        if not await recorder.wait_ready(5.0):
            raise PoolTimeout("feedback tables not ready: PostgreSQL unreachable")
        current = self._champion.current()
        if current is None:
            return error_response(request, 503, "not_ready", "no model loaded yet")
        classes: list[str] = current.get("classes") or []
        if current.get("task") != "classification" or body.label not in classes:
            message = f"label: one of {classes}" if classes else "feedback needs a classification model's predictions"
            details = [{"loc": ["body", "label"], "msg": message, "type": "value_error"}]
            return error_response(request, 422, "validation_error", message, details)
        settings = get_settings()
        result = await recorder.store.add_feedback(body.request_id, body.index, body.label, settings.feedback.max_age_s)
        if result.outcome is FeedbackOutcome.UNKNOWN:
            # The prediction may still sit in this replica's write buffer, or in a flush under way:
            # flush() waits for that one and writes what is left.
            await recorder.flush()
            result = await recorder.store.add_feedback(
                body.request_id, body.index, body.label, settings.feedback.max_age_s
            )
        self._metrics.feedback.inc(tags={"outcome": result.outcome.value, "model_version": result.model_version or ""})
        if result.outcome is FeedbackOutcome.UNKNOWN:
            return error_response(
                request, 404, "not_found", f"no prediction {body.request_id!r} with index {body.index}"
            )
        if result.outcome is FeedbackOutcome.EXPIRED:
            age = settings.feedback.max_age_s
            details = [{"loc": ["body", "request_id"], "msg": f"prediction older than {age:.0f} s", "type": "expired"}]
            return error_response(request, 422, "feedback_expired", "the prediction is too old for feedback", details)
        log.info(
            "feedback %s for %s[%d]",
            result.outcome.value,
            body.request_id,
            body.index,
            extra={"model_version": result.model_version, "correct": result.correct},
        )
        if result.outcome is FeedbackOutcome.DUPLICATE:
            response.status_code = 200
        return FeedbackResponse(
            request_id=body.request_id,
            index=body.index,
            label=result.label or body.label,
            outcome=result.outcome.value,
            predicted=result.predicted,
            correct=result.correct,
            model={"name": result.model_name or "", "version": result.model_version or ""},
        )

    @api.post(
        "/v1/alerts/alertmanager",
        tags=["alerts"],
        response_model=AlertWebhookResponse,
        responses={
            401: {"model": ErrorResponse, "description": "missing or invalid webhook token"},
            422: {"model": ErrorResponse, "description": "not an Alertmanager webhook body; details name the field"},
            503: {"model": ErrorResponse, "description": "webhook or asynchronous training not configured"},
            **_EDGE_RESPONSES,
        },
        dependencies=[Depends(require_alert_token)],
    )
    async def alert_webhook(self, payload: AlertmanagerPayload, request: Request) -> Any:
        """Alertmanager's webhook: each firing alert labelled `action: retrain` enqueues one
        training job per alert episode (its fingerprint and start time are the idempotency key,
        so Alertmanager's repeats and retries return the same job)."""
        settings = get_settings()
        retrain: list[RetrainRequest] = []
        for alert in payload.alerts:
            if alert.status != "firing" or alert.labels.get("action") != "retrain":
                continue
            jobs = await self._training_jobs()
            name = alert.labels.get("alertname", "alert")
            spec = JobSpec(
                kind=settings.retrain.kind,
                config=settings.retrain.config,
                overrides=settings.retrain.overrides,
                idempotency_key=f"alert:{name}:{alert.fingerprint}:{alert.episode}"[:200],
            )
            # The overrides come from the cluster's own settings (RETRAIN_OVERRIDES): an operator's.
            job, created = await jobs.submit(spec, request.state.traceparent, operator=True)
            self._metrics.retrain_requests.inc(tags={"created": str(created).lower()})
            log.info(
                "alert %s (%s): retrain job %s %s",
                name,
                alert.fingerprint,
                job.id,
                "queued" if created else "already queued",
                extra={"job_id": str(job.id), "alert": name, "model_version": alert.labels.get("model_version")},
            )
            retrain.append(
                RetrainRequest(alert=name, fingerprint=alert.fingerprint, job_id=str(job.id), created=created)
            )
        return AlertWebhookResponse(retrain=retrain)

    @api.get(
        "/v1/models/current",
        tags=["models"],
        response_model=CurrentModel,
        responses=_ERROR_RESPONSES,
        dependencies=[Depends(require_api_key)],
    )
    async def current_model(self, request: Request) -> Any:
        """The model version being served, its schema and test metrics."""
        current = self._champion.current()
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
        job, created = await jobs.submit(spec, request.state.traceparent)
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
