"""Liveness and readiness, without authentication: load balancers and Serve probe them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from serve_apps.dependencies import ReplicaDep
from serve_apps.errors import EDGE_RESPONSES, error_response
from serve_apps.schemas import ErrorResponse

router = APIRouter(tags=["health"], responses=EDGE_RESPONSES)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the ingress answers. No authentication."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorResponse}})
async def readyz(request: Request, replica: ReplicaDep) -> Any:
    """Readiness: 200 once a model is loaded and can answer, 503 before."""
    status = replica.champion.status()
    if not status["ready"]:
        return error_response(
            request,
            503,
            "not_ready",
            "no model loaded yet",
            details=[{"msg": status["last_error"] or "waiting for a champion"}],
        )
    return {"status": "ready", "model": status["model"]}
