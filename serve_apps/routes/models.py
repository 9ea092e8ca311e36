"""The models the API serves: their versions, schemas and test metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve_apps.dependencies import ModelName, Predictor, ReplicaDep, visible_model
from serve_apps.errors import MODEL_RESPONSES, PREDICT_RESPONSES, error_response
from serve_apps.fleet import ModelUnavailableError, UnknownModelError
from serve_apps.schemas import CurrentModel, ModelList, ServedModel

router = APIRouter(tags=["models"], responses=PREDICT_RESPONSES)


# Before /v1/models/{name}: "current" names the default model here, not a registered model.
@router.get("/v1/models/current", response_model=CurrentModel, responses={404: MODEL_RESPONSES[404]})
async def current_model(request: Request, replica: ReplicaDep, principal: Predictor) -> Any:
    """The default model's (`MODEL_NAME`) version being served, its schema and test metrics."""
    visible_model(principal, replica.champion.model_name, replica.champion.alias)
    current = replica.champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", "no model loaded yet")
    return current


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
    test metrics, and a refused swap if any."""
    visible_model(principal, name, replica.champion.alias)
    champion = await replica.fleet.get(name)
    current = champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", f"no {champion.alias} of {name} is loaded yet")
    return current
