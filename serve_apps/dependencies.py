"""FastAPI dependencies of the routes, as `Annotated` aliases: the replica's state, and
authentication (applied per router)."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import Depends, Path, Request
from fastapi.exceptions import RequestValidationError

from core.keys import Principal, Scope
from jobs.config import MODEL_NAME_PATTERN
from serve_apps.auth import require, require_alert_token
from serve_apps.fleet import UnknownModelError
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

# The caller's key, with the scope each route needs (a 403 naming it otherwise).
Predictor = Annotated[Principal, Depends(require(Scope.PREDICT))]
FeedbackGiver = Annotated[Principal, Depends(require(Scope.FEEDBACK))]
Trainer = Annotated[Principal, Depends(require(Scope.TRAIN))]


def visible_model(principal: Principal, name: str, alias: str) -> None:
    """A key restricted to some models is told the others do not exist (the same 404)."""
    if not principal.may_use_model(name):
        raise UnknownModelError(name, alias)


async def single_valued_query(request: Request) -> None:
    """A scalar query parameter given twice is ambiguous (frameworks disagree on which value wins):
    refuse it rather than pick one the client may not have meant."""
    given = Counter(name for name, _ in request.query_params.multi_items())
    repeated = sorted(name for name, times in given.items() if times > 1)
    if repeated:
        raise RequestValidationError(
            [
                {"loc": ("query", name), "msg": "given more than once; send a single value", "type": "single_value"}
                for name in repeated
            ]
        )


# Declared after the route's key dependency, so that an unauthenticated request is a 401 first.
SingleValuedQuery = Annotated[None, Depends(single_valued_query)]

# Router-level: every route of the alert router requires Alertmanager's token.
ALERT_TOKEN = Depends(require_alert_token)
