"""True labels for predicted rows: the source of live accuracy."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request, Response
from psycopg_pool import PoolTimeout

from serve_apps.dependencies import FeedbackGiver, ReplicaDep
from serve_apps.errors import FEEDBACK_RESPONSES, error_response, validation_error
from serve_apps.schemas import FeedbackRequest, FeedbackResponse
from services.feedback.store import FeedbackOutcome

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["inference"])


@router.post(
    "/v1/feedback",
    status_code=201,
    response_model=FeedbackResponse,
    responses={
        200: {"model": FeedbackResponse, "description": "a label was already given for this row; the first one stays"},
        **FEEDBACK_RESPONSES,
    },
)
async def feedback(
    body: FeedbackRequest, request: Request, response: Response, replica: ReplicaDep, principal: FeedbackGiver
) -> Any:
    """The true label of one predicted instance (`request_id` and `index` from a predict answer,
    of any served model): one of that model's classes. Counts towards the live accuracy of the
    version that made the prediction; repeats are ignored (200, the first label stays)."""
    recorder = replica.feedback_recorder()
    if not await recorder.wait_ready(5.0):
        raise PoolTimeout("feedback tables not ready: PostgreSQL unreachable")
    model_name = await recorder.store.predicted_by(body.request_id, body.index)
    if model_name is None:
        # The prediction may still sit in this replica's write buffer, or in a flush under way:
        # flush() waits for that one and writes what is left.
        await recorder.flush()
        model_name = await recorder.store.predicted_by(body.request_id, body.index)
    if model_name is not None and not principal.may_use_model(model_name):
        model_name = None  # a key restricted to other models is told the prediction does not exist
    if model_name is None:
        replica.metrics.feedback.inc(tags={"outcome": FeedbackOutcome.UNKNOWN.value, "model": "", "model_version": ""})
        return error_response(request, 404, "not_found", f"no prediction {body.request_id!r} with index {body.index}")
    # The label is checked against the classes of the model that made the prediction.
    current = (await replica.fleet.get(model_name)).current()
    if current is None:
        return error_response(request, 503, "not_ready", f"model {model_name!r} is not loaded yet")
    classes: list[str] = current.get("classes") or []
    if current.get("task") != "classification" or body.label not in classes:
        message = f"label: one of {classes}" if classes else "feedback needs a classification model's predictions"
        return validation_error(request, message, ["body", "label"], message, "value_error")
    max_age_s = replica.settings.feedback.max_age_s
    result = await recorder.store.add_feedback(body.request_id, body.index, body.label, max_age_s)
    tags = {"outcome": result.outcome.value, "model": model_name, "model_version": result.model_version or ""}
    replica.metrics.feedback.inc(tags=tags)
    if result.outcome is FeedbackOutcome.UNKNOWN:  # gone since: its rows expired and were deleted
        return error_response(request, 404, "not_found", f"no prediction {body.request_id!r} with index {body.index}")
    if result.outcome is FeedbackOutcome.EXPIRED:
        details = [
            {"loc": ["body", "request_id"], "msg": f"prediction older than {max_age_s:.0f} s", "type": "expired"}
        ]
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
