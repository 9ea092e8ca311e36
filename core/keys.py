"""API keys in PostgreSQL: added and revoked with `python -m cluster keys`, picked up by every
ingress replica within `API_KEY_REFRESH_S`, without a restart.

The table holds a SHA-256 digest per key, never the key. Keys in `API_KEYS` are accepted as well
(they bootstrap a fresh install), unless the table lists their digest as revoked. A replica reads
the table in the background and swaps its in-memory set of accepted digests, so a request never
waits on the database; while PostgreSQL is away the replica keeps the last set it read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg

from core.database import PostgresStore

log = logging.getLogger("ray.serve")

# Names end up in `keys list` and in logs: short, printable, no whitespace.
KEY_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

MIGRATIONS: list[str] = [
    """
    CREATE TABLE api_keys (
        name text PRIMARY KEY CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
        key_sha256 text NOT NULL UNIQUE CHECK (key_sha256 ~ '^[0-9a-f]{64}$'),
        created_at timestamptz NOT NULL DEFAULT now(),
        revoked_at timestamptz
    );
    """,
]


class KeyNameTakenError(Exception):
    pass


class KeyAlreadyStoredError(Exception):
    """The same key is registered under another name."""


@dataclass(frozen=True)
class ApiKeyRecord:
    name: str
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class TableHashes:
    active: frozenset[str]
    revoked: frozenset[str]


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class KeyStore:
    """The digests a replica accepts. Keys are held as SHA-256 digests only, so a memory dump gives
    no key away; the set can be replaced while the replica serves, and a check is one digest and
    one set lookup: no database access per request."""

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
        return hash_api_key(presented) in self._hashes


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def valid_key_name(name: str) -> bool:
    return KEY_NAME_PATTERN.fullmatch(name) is not None


def accepted_hashes(bootstrap: Iterable[str], table: TableHashes) -> frozenset[str]:
    """What a replica accepts: API_KEYS and the table's active keys, less every revoked digest (a
    revocation in the table wins over API_KEYS, which cannot change without a restart)."""
    return (frozenset(bootstrap) | table.active) - table.revoked


class ApiKeyTable(PostgresStore):
    SCHEMA_TABLE = "api_keys_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "api-keys"
    # A replica's refresh keeps the last key set when the server is away, so it need not wait long.
    POOL_MAX_SIZE = 2
    RETRY_FOR_S = 2.0
    POOL_TIMEOUT_S = 2.0

    async def add(self, name: str, key_hash: str) -> ApiKeyRecord:
        async def op(conn: psycopg.AsyncConnection[Any]) -> ApiKeyRecord:
            async with self._transaction(conn) as cur:
                await cur.execute("SELECT 1 FROM api_keys WHERE name = %s", (name,))
                if await cur.fetchone() is not None:
                    raise KeyNameTakenError(name)
                await cur.execute("SELECT name FROM api_keys WHERE key_sha256 = %s", (key_hash,))
                if (existing := await cur.fetchone()) is not None:
                    raise KeyAlreadyStoredError(existing["name"])
                await cur.execute(
                    "INSERT INTO api_keys (name, key_sha256) VALUES (%s, %s) RETURNING name, created_at, revoked_at",
                    (name, key_hash),
                )
                return _record(await cur.fetchone())

        try:
            return await self._retrying(op)
        except psycopg.errors.UniqueViolation as exc:  # a concurrent `keys add` won the race
            raise KeyNameTakenError(name) from exc

    async def revoke(self, name: str) -> ApiKeyRecord | None:
        """Mark the key revoked (the row stays, as a record); a second revoke keeps the first time.
        None when no key has this name."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> ApiKeyRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s
                    RETURNING name, created_at, revoked_at
                    """,
                    (name,),
                )
                row = await cur.fetchone()
                return None if row is None else _record(row)

        return await self._retrying(op)

    async def records(self) -> list[ApiKeyRecord]:
        async def op(conn: psycopg.AsyncConnection[Any]) -> list[ApiKeyRecord]:
            async with self._transaction(conn) as cur:
                await cur.execute("SELECT name, created_at, revoked_at FROM api_keys ORDER BY created_at, name")
                return [_record(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def hashes(self) -> TableHashes:
        async def op(conn: psycopg.AsyncConnection[Any]) -> TableHashes:
            cur = await conn.execute("SELECT key_sha256, revoked_at IS NOT NULL FROM api_keys")
            rows = await cur.fetchall()
            return TableHashes(
                active=frozenset(str(h) for h, revoked in rows if not revoked),
                revoked=frozenset(str(h) for h, revoked in rows if revoked),
            )

        return await self._retrying(op)


def _record(row: dict[str, Any] | None) -> ApiKeyRecord:
    assert row is not None
    return ApiKeyRecord(name=row["name"], created_at=row["created_at"], revoked_at=row["revoked_at"])


class KeyRefresher:
    """Keeps a replica's `KeyStore` in step with the table, every `interval_s`, in the background."""

    def __init__(self, table: ApiKeyTable, store: KeyStore, bootstrap: Iterable[str], interval_s: float) -> None:
        self._table = table
        self._store = store
        self._bootstrap = frozenset(bootstrap)
        self._interval_s = interval_s
        self._migrated = False
        self._reachable = True
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> bool:
        """One read of the table; on failure the store keeps what it has. True when it was read."""
        try:
            if not self._migrated:
                await self._table.migrate()
                self._migrated = True
            table = await self._table.hashes()
        except Exception as exc:
            # Warn when the database goes away, not on every interval while it stays away.
            if self._reachable:
                log.warning(
                    "API keys not refreshed (%s: %s); keeping the %d keys accepted so far",
                    type(exc).__name__,
                    exc,
                    len(self._store.hashes),
                )
            self._reachable = False
            return False
        accepted = accepted_hashes(self._bootstrap, table)
        if not self._reachable or accepted != self._store.hashes:
            log.info(
                "API keys: %d accepted (%d from API_KEYS, %d active and %d revoked in the table)",
                len(accepted),
                len(self._bootstrap),
                len(table.active),
                len(table.revoked),
            )
        self._reachable = True
        self._store.replace(accepted)
        return True

    async def start(self, first_refresh_timeout_s: float) -> None:
        """The first read happens before the replica serves, so that a key revoked in the table is
        refused from the first request; a database that does not answer in time does not hold
        the replica back (it starts with API_KEYS and keeps trying)."""
        await self._table.open()
        try:
            await asyncio.wait_for(self.refresh(), first_refresh_timeout_s)
        except TimeoutError:
            log.warning(
                "API keys: the table did not answer within %.0f s; starting with API_KEYS", first_refresh_timeout_s
            )
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.refresh()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        await self._table.close()


# How long a starting replica waits for its first read of the table.
FIRST_REFRESH_TIMEOUT_S = 5.0


async def start_key_refresher(
    store: KeyStore, bootstrap: Iterable[str], database_url: str | None, interval_s: float
) -> KeyRefresher | None:
    """The replica's refresher; None without a database, where API_KEYS are the only keys."""
    if database_url is None:
        return None
    table = ApiKeyTable(database_url)
    refresher = KeyRefresher(table, store, bootstrap, interval_s)
    await refresher.start(FIRST_REFRESH_TIMEOUT_S)
    return refresher
