"""The models the API serves: their versions, schemas and test metrics, and how their recent traffic
compares with their training data."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from core.database import TRANSIENT_DB_ERRORS
from serve_apps.dependencies import ModelName, Predictor, ReplicaDep, visible_model
from serve_apps.errors import MODEL_RESPONSES, PREDICT_RESPONSES, error_response
from serve_apps.fleet import ModelUnavailableError, UnknownModelError
from serve_apps.replica import Replica
from serve_apps.schemas import CurrentModel, ErrorResponse, ModelList, ModelMonitoring, ServedModel

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["models"], responses=PREDICT_RESPONSES)


# Before /v1/models/{name}: "current" names the default model here, not a registered model.
@router.get("/v1/models/current", response_model=CurrentModel, responses={404: MODEL_RESPONSES[404]})
async def current_model(request: Request, replica: ReplicaDep, principal: Predictor) -> Any:
    """The default model's (`MODEL_NAME`) version being served, its schema and test metrics."""
    visible_model(principal, replica.champion.model_name, replica.champion.alias)
    current = replica.champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", "no model loaded yet")
    return await _with_rollout(replica, replica.champion.model_name, current)


@router.get("/v1/models", response_model=ModelList, responses={503: MODEL_RESPONSES[503]})
async def list_models(replica: ReplicaDep, principal: Predictor) -> Any:
    """Every registered model with a champion alias that this key may use, each servable at
    /v1/models/{name}/predict: the version the alias names, and the version this replica answers
    with, with its schema."""
    try:
        aliased = await replica.fleet.servable(replica.champion.registry)
    except Exception as exc:
        raise ModelUnavailableError(f"the model registry is unreachable ({type(exc).__name__})") from exc
    aliased = [(name, version) for name, version in aliased if principal.may_use_model(name)]
    listed: list[ServedModel] = []
    # Beyond what one replica keeps loaded, listing would only evict the models in use.
    others_to_load = replica.fleet.max_models - 1
    for name, version in aliased:
        entry = ServedModel(name=name, default=name == replica.champion.model_name, champion_version=version)
        if not entry.default:
            others_to_load -= 1
        if entry.default or others_to_load >= 0:
            try:
                champion = await replica.fleet.get(name)
                current = champion.current()
                entry.serving = CurrentModel.model_validate(current) if current else None
            except (UnknownModelError, ModelUnavailableError) as exc:
                entry.error = str(exc)
        listed.append(entry)
    return ModelList(models=listed)


@router.get("/v1/models/{name}", response_model=CurrentModel, responses=MODEL_RESPONSES)
async def get_model(name: ModelName, request: Request, replica: ReplicaDep, principal: Predictor) -> Any:
    """The champion of the registered model `name` as this replica serves it: version, schema,
    test metrics, a refused swap if any, and its rollout: the challenger, the mode, the step and
    share, the figures so far and the decisions (docs/rollout.md)."""
    visible_model(principal, name, replica.champion.alias)
    champion = await replica.fleet.get(name)
    current = champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", f"no {champion.alias} of {name} is loaded yet")
    return await _with_rollout(replica, name, current)


async def _with_rollout(replica: Replica, name: str, current: dict[str, Any]) -> dict[str, Any]:
    rollout, error = await replica.rollout_overview(name)
    return {**current, "rollout": rollout, "rollout_error": error}


MONITORING_RESPONSES: dict[int | str, dict[str, Any]] = {
    **MODEL_RESPONSES,
    503: {
        "model": ErrorResponse,
        "description": "the model is not loaded yet, the registry or the database is unreachable, or monitoring "
        "is not configured (no DATABASE_URL)",
    },
}

_MONITORING_UNAVAILABLE: tuple[type[Exception], ...] = (*TRANSIENT_DB_ERRORS, TimeoutError)


@router.get("/v1/models/{name}/monitoring", response_model=ModelMonitoring, responses=MONITORING_RESPONSES)
async def model_monitoring(name: ModelName, request: Request, replica: ReplicaDep, principal: Predictor) -> Any:
    """How the recent traffic of the version of `name` this replica serves compares with its
    training data: the drift of each feature and of the model's outputs, the accuracy estimated
    from the calibrated probabilities, and the accuracy measured from feedback. The dispatcher's
    monitor refreshes it every MONITOR_REFRESH_S from the predictions of the last
    MONITOR_WINDOW_S; `pending` until it has judged the version."""
    visible_model(principal, name, replica.champion.alias)
    champion = await replica.fleet.get(name)
    current = champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", f"no {champion.alias} of {name} is loaded yet")
    version = str(current["version"])
    recorder = replica.prediction_recorder()
    if recorder is None:
        return error_response(
            request, 503, "monitoring_disabled", "model monitoring is not configured: set DATABASE_URL for the cluster"
        )
    settings = replica.settings
    try:
        if not await recorder.wait_ready(5.0):
            raise TimeoutError("the monitoring tables are not ready")
        record = await recorder.store.monitoring_report(name, version)
        feedback = await recorder.store.version_feedback(name, version, settings.accuracy.window_s)
    except _MONITORING_UNAVAILABLE as exc:
        log.warning("monitoring of %s unavailable: %s", name, exc)
        return error_response(
            request,
            503,
            "monitoring_store_unavailable",
            "the monitoring store (PostgreSQL) is unreachable; retry later",
            headers={"Retry-After": "5"},
        )
    if record is None:
        body: dict[str, Any] = {
            "status": "pending",
            "computed_at": None,
            "window_rows": 0,
            "min_rows": settings.monitor.min_rows,
            "drift_share": None,
            "drift_share_threshold": settings.monitor.drift_share_threshold,
            "dataset_drift": False,
            "features": [],
            "prediction": None,
            "estimated_accuracy": None,
            "estimated_roc_auc": None,
            "reference_accuracy": None,
        }
    else:
        body = {**record.report, "computed_at": record.computed_at}
    measured = feedback.accuracy if feedback.feedback >= settings.accuracy.min_feedback else None
    return ModelMonitoring.model_validate(
        {
            **body,
            "model": name,
            "version": version,
            "measured_accuracy": measured,
            "measured_feedback": feedback.feedback,
        }
    )
