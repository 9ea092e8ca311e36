"""API-key authentication and authorization as FastAPI dependencies, against the replica's
`KeyStore` (core/keys.py), which a background task keeps in step with the PostgreSQL key table.

A missing, wrong or revoked key is a 401; a valid key without the route's scope is a 403 that
names the scope (`MissingScopeError`, answered by serve_apps/errors.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from core.keys import KeyStore, Principal, Scope

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


class MissingScopeError(Exception):
    """A valid key that lacks the scope a route needs."""

    def __init__(self, principal: Principal, scope: Scope) -> None:
        super().__init__(
            f"this API key ({principal.name}) lacks the {scope.value!r} scope; an operator can grant it: "
            f"python -m cluster keys add NAME --scopes {scope.value}"
        )
        self.principal = principal
        self.scope = scope


# Async on purpose: FastAPI runs a plain `def` dependency in a thread pool, and that hand-off
# cost more than the whole check (py-spy, benchmarks/README.md).
async def authenticate(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    api_key: str | None = Depends(header_scheme),
) -> Principal:
    store: KeyStore = request.app.state.key_store
    principal = store.verify(bearer.credentials if bearer is not None else api_key)
    if principal is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # For the access log and the audit records: who, never the key.
    request.state.principal = principal
    return principal


def require(scope: Scope) -> Callable[..., Awaitable[Principal]]:
    """A dependency that authenticates and then requires `scope` (admin holds every scope)."""

    async def check(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.allows(scope):
            raise MissingScopeError(principal, scope)
        return principal

    check.__name__ = f"require_{scope.value}"
    return check


async def require_alert_token(
    request: Request, bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme)
) -> None:
    """Alertmanager's webhook credentials (`http_config.authorization`), separate from user keys
    so that a user key cannot start retraining through this route."""
    store: KeyStore | None = request.app.state.alert_token_store
    if store is None:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="the alert webhook is not configured: set ALERT_WEBHOOK_TOKEN for the cluster",
        )
    if store.verify(bearer.credentials if bearer is not None else None) is None:
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid webhook token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
