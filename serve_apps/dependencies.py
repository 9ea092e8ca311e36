"""FastAPI dependencies of the routes, as `Annotated` aliases: the replica's state, and
authentication (applied per router)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Request

from jobs.config import MODEL_NAME_PATTERN
from serve_apps.auth import require_alert_token, require_api_key
from serve_apps.replica import Replica


# Async on purpose: FastAPI runs a plain `def` dependency in its thread pool, a hand-off that costs
# more than the look-up (serve_apps/auth.py's dependencies are async for the same reason).
async def get_replica(request: Request) -> Replica:
    replica: Replica = request.app.state.replica
    return replica


# The services a replica connects to on first use (the job store, the prediction recorder) are
# reached through the replica inside each route, after the body is validated: an invalid request
# is a 422 whether or not PostgreSQL answers.
ReplicaDep = Annotated[Replica, Depends(get_replica)]

# A registered model's name, as the routes that serve one take it from their path.
ModelName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN, description="a registered model's name")]

# Router-level: every route of a router that lists one of these requires it.
API_KEY = Depends(require_api_key)
ALERT_TOKEN = Depends(require_alert_token)
