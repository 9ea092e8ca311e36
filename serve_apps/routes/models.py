"""The models the API serves: their versions, schemas and test metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve_apps.dependencies import API_KEY, ReplicaDep
from serve_apps.errors import PREDICT_RESPONSES, error_response
from serve_apps.schemas import CurrentModel

router = APIRouter(tags=["models"], dependencies=[API_KEY], responses=PREDICT_RESPONSES)


@router.get("/v1/models/current", response_model=CurrentModel)
async def current_model(request: Request, replica: ReplicaDep) -> Any:
    """The model version being served, its schema and test metrics."""
    current = replica.champion.current()
    if current is None:
        return error_response(request, 503, "not_ready", "no model loaded yet")
    return current
