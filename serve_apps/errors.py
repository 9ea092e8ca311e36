"""One error shape for every status code (`ErrorResponse`), and the mapping of exceptions to it.

Routes raise; the handlers installed here answer. Each route's OpenAPI entry names the statuses it
can answer with through the `*_RESPONSES` tables, so the schema and the answers agree.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.database import TRANSIENT_DB_ERRORS
from serve_apps.auth import MissingScopeError
from serve_apps.context import request_id_from
from serve_apps.fleet import ModelUnavailableError, UnknownModelError
from serve_apps.schemas import ARROW_STREAM, PARQUET_TYPES, ErrorResponse
from services.training_jobs.models import InvalidJobSpecError, ModelNotAllowedError
from services.training_jobs.quota import QuotaExceededError
from services.training_jobs.store import IdempotencyConflictError, JobFinishedError, JobNotFoundError

log = logging.getLogger("ray.serve")

# Answered by Nginx in front of every route, in the same error shape.
EDGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    413: {"model": ErrorResponse, "description": "request body larger than the edge accepts"},
    429: {"model": ErrorResponse, "description": "rate limited at the edge; retry after Retry-After seconds"},
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing, invalid or revoked API key"},
    403: {"model": ErrorResponse, "description": "the API key lacks the scope this route needs (named in the body)"},
}
PREDICT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    422: {"model": ErrorResponse, "description": "invalid request; details name each field"},
    503: {"model": ErrorResponse, "description": "no model loaded yet"},
    **EDGE_RESPONSES,
}
# The routes that name a model in their path.
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {
    **PREDICT_RESPONSES,
    404: {
        "model": ErrorResponse,
        "description": "no registered model of this name has a champion alias, or the key is not allowed to use it",
    },
    503: {"model": ErrorResponse, "description": "the model is not loaded yet, or the registry is unreachable"},
}
JOB_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    404: {"model": ErrorResponse, "description": "no such training job (or one started by another key)"},
    409: {
        "model": ErrorResponse,
        "description": "idempotency key already used for a different job spec, or the job has already ended",
    },
    422: {"model": ErrorResponse, "description": "invalid job spec; details name the field"},
    429: {
        "model": ErrorResponse,
        "description": "this key's job limit is reached, or rate limited at the edge; retry after Retry-After seconds",
    },
    503: {"model": ErrorResponse, "description": "asynchronous training disabled, or the job store is unreachable"},
    **EDGE_RESPONSES,
}
FEEDBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    404: {
        "model": ErrorResponse,
        "description": "no prediction with this request id and index, or its model is no longer served",
    },
    422: {"model": ErrorResponse, "description": "invalid body, unknown label, or the prediction is too old"},
    503: {"model": ErrorResponse, "description": "feedback disabled, no model loaded, or the database is unreachable"},
    **EDGE_RESPONSES,
}
ALERT_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or invalid webhook token"},
    422: {"model": ErrorResponse, "description": "not an Alertmanager webhook body; details name the field"},
    503: {"model": ErrorResponse, "description": "webhook or asynchronous training not configured"},
    **EDGE_RESPONSES,
}


class TrainingJobsDisabledError(Exception):
    """Asynchronous training needs DATABASE_URL and AMQP_URL."""


class FeedbackDisabledError(Exception):
    """Feedback needs DATABASE_URL."""


def request_id_of(request: Request) -> str:
    existing: str | None = getattr(request.state, "request_id", None)
    if existing:
        return existing
    rid = request_id_from(request.headers.get("X-Request-ID"))
    request.state.request_id = rid
    return rid


class _ErrorJSONResponse(JSONResponse):
    """ASCII-escaped JSON: error details echo the caller's field names, and a lone surrogate
    (valid as a JSON escape, invalid in UTF-8) must not turn a 422 into a 500."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(
    request: Request, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {"code": code, "message": message, "request_id": request_id_of(request)}
    if details is not None:
        body["details"] = details
    # Serve's proxy echoes the request id in the X-Request-ID response header; the body carries it too.
    return _ErrorJSONResponse({"error": body}, status_code=status, headers=headers)


def validation_error(request: Request, message: str, loc: list[Any], msg: str, kind: str) -> JSONResponse:
    """A 422 about one field, in the shape FastAPI's own validation errors have."""
    return error_response(request, 422, "validation_error", message, [{"loc": loc, "msg": msg, "type": kind}])


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
        return validation_error(request, message, ["body"], reason, "json_invalid")
    codes = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}
    return error_response(
        request,
        exc.status_code,
        codes.get(exc.status_code, "http_error"),
        str(exc.detail),
        headers=dict(exc.headers) if exc.headers else None,
    )


def _table_body(request: Request) -> bool:
    """Whether the request's Content-Type is one of the table bodies (serve_apps/routes/inference.py)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return media_type in (ARROW_STREAM, *PARQUET_TYPES)


def _request_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type")} for e in exc.errors()]
    fields = ", ".join(".".join(str(p) for p in d["loc"]) for d in details[:5])
    message = f"invalid request: {fields}: {details[0]['msg']}" if details else "invalid request"
    if _table_body(request):
        # The caller chose a table: what to change is in the table, not a switch to JSON.
        if any(d["loc"] == ["body"] for d in details):
            message += " (send an uncompressed Arrow IPC stream or a Parquet file with a column per feature)"
    elif any(d["loc"] == ["body"] or d["type"] == "json_invalid" for d in details):
        # FastAPI's loc for a JSON syntax error is ["body", <character offset>].
        message += " (send a JSON object with Content-Type: application/json)"
    return error_response(request, 422, "validation_error", message, details)


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
    return validation_error(request, exc.message, exc.loc, exc.message, "value_error")


def _idempotency_conflict(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, IdempotencyConflictError)
    detail = {
        "loc": ["header", "Idempotency-Key"],
        "msg": str(exc),
        "type": "idempotency_conflict",
        "ctx": {"existing_job_id": str(exc.existing.id)},
    }
    return error_response(request, 409, "idempotency_conflict", str(exc), [detail])


def _missing_scope(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MissingScopeError)
    log.info("refused: key %s lacks scope %s", exc.principal.name, exc.scope.value)
    detail = {
        "loc": ["header", "Authorization"],
        "msg": f"requires the {exc.scope.value!r} scope",
        "type": "missing_scope",
        "ctx": {"scope": exc.scope.value},
    }
    return error_response(request, 403, "missing_scope", str(exc), [detail])


def _model_not_allowed(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ModelNotAllowedError)
    detail = {"loc": exc.loc, "msg": str(exc), "type": "model_not_allowed", "ctx": {"model": exc.model}}
    return error_response(request, 403, "model_not_allowed", str(exc), [detail])


def _quota_exceeded(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, QuotaExceededError)
    detail = {
        "loc": ["header", "Authorization"],
        "msg": exc.message,
        "type": f"{exc.limit}_job_limit",
        "ctx": {"limit": exc.limit, "limit_value": exc.limit_value},
    }
    return error_response(
        request, 429, "job_limit_exceeded", exc.message, [detail], headers={"Retry-After": str(exc.retry_after_s)}
    )


def _job_not_found(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobNotFoundError)
    return error_response(request, 404, "not_found", f"no training job {exc.job_id}")


def _job_finished(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobFinishedError)
    record = exc.record
    message = (
        f"training job {record.id} has already ended ({record.state.value}); "
        "only a queued or running job can be cancelled"
    )
    detail = {"loc": ["path", "job_id"], "msg": message, "type": "job_finished", "ctx": {"state": record.state.value}}
    return error_response(request, 409, "job_finished", message, [detail])


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


def _unknown_model(request: Request, exc: Exception) -> JSONResponse:
    return error_response(request, 404, "model_not_found", str(exc))


def _model_unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("%s", exc)
    return error_response(request, 503, "model_unavailable", str(exc), headers={"Retry-After": "5"})


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _request_validation_error)
    app.add_exception_handler(TrainingJobsDisabledError, _training_jobs_disabled)
    app.add_exception_handler(FeedbackDisabledError, _feedback_disabled)
    app.add_exception_handler(InvalidJobSpecError, _invalid_job_spec)
    app.add_exception_handler(IdempotencyConflictError, _idempotency_conflict)
    app.add_exception_handler(MissingScopeError, _missing_scope)
    app.add_exception_handler(ModelNotAllowedError, _model_not_allowed)
    app.add_exception_handler(QuotaExceededError, _quota_exceeded)
    app.add_exception_handler(JobNotFoundError, _job_not_found)
    app.add_exception_handler(JobFinishedError, _job_finished)
    app.add_exception_handler(UnknownModelError, _unknown_model)
    app.add_exception_handler(ModelUnavailableError, _model_unavailable)
    for error in TRANSIENT_DB_ERRORS:
        app.add_exception_handler(error, _store_unavailable)
