"""API-key authentication as a FastAPI dependency.

Keys are held as SHA-256 digests only, so a memory dump gives no key away. The set of accepted
digests can be replaced while the replica serves (serve_apps/api_keys.py refreshes it from
PostgreSQL), and a check is one digest and one set lookup: no database access per request.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

bearer_scheme = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
header_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <API key>")


class KeyStore:
    def __init__(self, key_hashes: Iterable[str]) -> None:
        hashes = frozenset(key_hashes)
        if not hashes:
            raise ValueError("no API keys configured")
        self._hashes = hashes

    @property
    def hashes(self) -> frozenset[str]:
        return self._hashes

    def replace(self, key_hashes: frozenset[str]) -> None:
        """Swap in a new set at once: a request sees either the old set or the new one. An empty
        set (every key revoked) refuses every request."""
        self._hashes = key_hashes

    def verify(self, presented: str | None) -> bool:
        if not presented:
            return False
        # A set lookup compares digests, not keys. Its timing can at most tell a caller how much of
        # the digest of their own guess matches a stored digest, which brings them no closer to a
        # key (SHA-256 is preimage resistant), so no constant-time loop over every key is needed.
        return hashlib.sha256(presented.encode("utf-8")).hexdigest() in self._hashes


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
