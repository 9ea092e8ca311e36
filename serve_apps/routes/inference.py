"""Predictions from the champion of each served model, batched across requests inside the replica;
during a canary a share of the callers get the challenger's, and during a shadow or canary rollout
every answered request is mirrored to the other version after the fact (serve_apps/shadow.py)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from opentelemetry import trace

from core.keys import Principal
from serve_apps.champion import BatchResult, ChampionModel, LoadedModel
from serve_apps.dependencies import ModelName, Predictor, ReplicaDep, visible_model
from serve_apps.errors import MODEL_RESPONSES, PREDICT_RESPONSES, error_response, request_id_of
from serve_apps.fleet import Routed
from serve_apps.replica import Replica
from serve_apps.rollout import route
from serve_apps.schemas import PredictRequest, PredictResponse
from services.feedback.store import PredictionRow

router = APIRouter(tags=["inference"], responses=PREDICT_RESPONSES)
_tracer = trace.get_tracer("serve_apps.ingress")


def _too_many_rows(request: Request, rows: int, max_rows: int) -> Response:
    details = [
        {
            "loc": ["body", "instances"],
            "msg": f"at most {max_rows} instances per request, got {rows}",
            "type": "too_long",
        }
    ]
    return error_response(request, 422, "validation_error", f"instances: at most {max_rows} per request", details)


@router.post("/v1/predict", response_model=PredictResponse, response_model_exclude_none=True)
async def predict(body: PredictRequest, request: Request, replica: ReplicaDep, principal: Predictor) -> Any:
    """Predict with the default model (`MODEL_NAME`): a label and its probability for each instance."""
    visible_model(principal, replica.champion.model_name, replica.champion.alias)
    return await _predict(body, request, replica, principal, replica.champion, "/v1/predict")


@router.post(
    "/v1/models/{name}/predict",
    response_model=PredictResponse,
    response_model_exclude_none=True,
    responses=MODEL_RESPONSES,
)
async def predict_with(
    name: ModelName, body: PredictRequest, request: Request, replica: ReplicaDep, principal: Predictor
) -> Any:
    """Predict with the champion of the registered model `name`: any model whose `champion` alias
    is set is served, from its first request on."""
    visible_model(principal, name, replica.champion.alias)
    champion = await replica.fleet.get(name)
    return await _predict(body, request, replica, principal, champion, "/v1/models/{name}/predict")


async def _predict(
    body: PredictRequest,
    request: Request,
    replica: Replica,
    principal: Principal,
    champion: ChampionModel,
    path: str,
) -> Response:
    if len(body.instances) > replica.max_rows:
        return _too_many_rows(request, len(body.instances), replica.max_rows)
    model = champion.loaded
    if model is None:
        return error_response(request, 503, "not_ready", f"no {champion.alias} of {champion.model_name} is loaded yet")
    errors = model.validator.validate(body.instances)
    if errors:
        fields = ", ".join(".".join(str(p) for p in e["loc"][1:]) for e in errors[:5])
        return error_response(request, 422, "validation_error", f"invalid instances: {fields}", errors)
    replica.metrics.request_rows.observe(len(body.instances), tags={"route": path, "model": champion.model_name})
    # The challenger accepts whatever the champion does (serve_apps/rollout.py refuses one that
    # does not), so the champion's validation stands for both.
    rollout = champion.rollout
    answering: LoadedModel = model
    mirror_to: LoadedModel | None = None
    if rollout is not None:
        answering, mirror_to = route(rollout, model, replica.canary_key, request, principal)
    # A child span for the model's share of the request (a no-op without Serve's tracing).
    with _tracer.start_as_current_span("model.predict") as span:
        result: BatchResult = await replica.predict_batch(Routed(champion, answering, body.instances))
        served = result.model
        span.set_attribute("model.name", served.name)
        span.set_attribute("model.version", served.version)
        span.set_attribute("model.rows", len(body.instances))
    trace.get_current_span().set_attribute("model.version", served.version)
    rid = request_id_of(request)
    recorder = replica.prediction_recorder()
    if recorder is not None:
        # The output goes with the row for the drift monitor (services/monitoring/live.py): class
        # probabilities for a classifier, the value for a regressor (serve_apps/champion.py).
        recorder.record(
            [
                PredictionRow(
                    rid,
                    i,
                    served.name,
                    served.version,
                    p.get("label"),
                    p.get("probability"),
                    instance,
                    {"probabilities": p["probabilities"]} if "probabilities" in p else {"value": p.get("value")},
                )
                for i, (instance, p) in enumerate(zip(body.instances, result.predictions, strict=True))
            ]
        )
    if mirror_to is not None and rollout is not None:
        if rollout.kind == "canary":
            replica.rollout_metrics.count_canary(served.name, served.version)
        replica.mirror(rollout.id, mirror_to, rid, body.instances)
    # Serialised once with orjson, bypassing FastAPI's response-model validation: the body is
    # built here from typed values, and re-validating a large answer costs more than the model
    # (benchmarks/README.md).
    return Response(
        orjson.dumps({"request_id": rid, "model": served.ref, "predictions": result.predictions}),
        media_type="application/json",
    )
