"""API-key authentication as FastAPI dependencies, against the replica's `KeyStore` (core/keys.py),
which a background task keeps in step with the PostgreSQL key table."""

from __future__ import annotations

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from core.keys import KeyStore

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


# Both dependencies are async on purpose: FastAPI runs a plain `def` dependency in a thread
# pool, and that hand-off cost more than the whole check (py-spy, benchmarks/README.md).
async def require_api_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None = Depends(bearer_scheme),
    api_key: str | None = Depends(header_scheme),
) -> None:
    store: KeyStore = request.app.state.key_store
    presented = bearer.credentials if bearer is not None else api_key
    if not store.verify(presented):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )


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
    if not store.verify(bearer.credentials if bearer is not None else None):
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid webhook token: send 'Authorization: Bearer <token>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
