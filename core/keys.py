"""API keys in PostgreSQL: added and revoked with `python -m cluster keys`, picked up by every
ingress replica within `API_KEY_REFRESH_S`, without a restart.

The table holds a SHA-256 digest per key, never the key, with what the key may do: its scopes
(`predict`, `feedback`, `train`, `admin`) and, optionally, the registered models it is restricted
to. Keys in `API_KEYS` are accepted as well, as admin keys (they bootstrap a fresh install), unless
the table lists their digest as revoked or registers it with scopes of its own. A replica reads the
table in the background and swaps its in-memory map of accepted digests, so a request never waits
on the database; while PostgreSQL is away the replica keeps the last map it read.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import psycopg

from core.audit import Actor
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
    # Keys added before scopes existed keep what they could do then: everything but the
    # operator's settings. New rows must name their scopes (no default).
    """
    ALTER TABLE api_keys
        ADD COLUMN scopes text[] NOT NULL DEFAULT ARRAY['predict', 'feedback', 'train']
            CHECK (cardinality(scopes) > 0 AND scopes <@ ARRAY['predict', 'feedback', 'train', 'admin']),
        ADD COLUMN models text[] CHECK (models IS NULL OR cardinality(models) > 0);
    ALTER TABLE api_keys ALTER COLUMN scopes DROP DEFAULT;
    """,
]


class Scope(StrEnum):
    PREDICT = "predict"  # predictions, and reading the served models' schemas
    FEEDBACK = "feedback"  # true labels for earlier predictions
    TRAIN = "train"  # start, list, read and cancel its own training jobs
    ADMIN = "admin"  # every scope, every job, and the operator's settings of a job


ALL_SCOPES: frozenset[Scope] = frozenset(Scope)
# Hex digits of a key's digest that name it in records: enough to tell keys apart, and a digest
# prefix gives nothing of the key away.
KEY_ID_LENGTH = 12


def parse_scopes(text: str) -> frozenset[Scope]:
    """`predict,feedback` as scopes; ValueError naming what is not a scope."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(names) - {scope.value for scope in Scope})
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; scopes are {', '.join(s.value for s in Scope)}")
    if not names:
        raise ValueError("no scopes given")
    return frozenset(Scope(name) for name in names)


@dataclass(frozen=True)
class Principal:
    """The holder of an accepted key: what it may do, and how records name it."""

    key_id: str
    name: str
    scopes: frozenset[Scope]
    # The registered models it may use; None for every model.
    models: frozenset[str] | None = None

    @property
    def admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def allows(self, scope: Scope) -> bool:
        return self.admin or scope in self.scopes

    def may_use_model(self, model: str) -> bool:
        return self.models is None or model in self.models

    def actor(self) -> Actor:
        return Actor(kind="api_key", key_id=self.key_id, name=self.name)


class KeyNameTakenError(Exception):
    pass


class KeyAlreadyStoredError(Exception):
    """The same key is registered under another name."""


@dataclass(frozen=True)
class ApiKeyRecord:
    name: str
    key_id: str
    scopes: frozenset[Scope]
    models: frozenset[str] | None
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True)
class TableKeys:
    active: Mapping[str, Principal]  # by digest
    revoked: frozenset[str]


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def key_id_of(key_hash: str) -> str:
    return key_hash[:KEY_ID_LENGTH]


def bootstrap_principals(
    key_hashes: Iterable[str], label: str = "API_KEYS", scopes: frozenset[Scope] = ALL_SCOPES
) -> dict[str, Principal]:
    """Keys from the environment: admin keys named by their place in the variable (`API_KEYS[1]`)."""
    return {
        digest: Principal(key_id=key_id_of(digest), name=f"{label}[{index}]", scopes=scopes)
        for index, digest in enumerate(dict.fromkeys(key_hashes), start=1)
    }


class KeyStore:
    """The digests a replica accepts, each with its principal. Keys are held as SHA-256 digests
    only, so a memory dump gives no key away; the map can be replaced while the replica serves,
    and a check is one digest and one dict lookup: no database access per request."""

    def __init__(self, principals: Mapping[str, Principal]) -> None:
        if not principals:
            raise ValueError("no API keys configured")
        self._principals: Mapping[str, Principal] = dict(principals)

    @property
    def principals(self) -> Mapping[str, Principal]:
        return self._principals

    def replace(self, principals: Mapping[str, Principal]) -> None:
        """Swap in a new map at once: a request sees either the old map or the new one. An empty
        map (every key revoked) refuses every request."""
        self._principals = dict(principals)

    def verify(self, presented: str | None) -> Principal | None:
        if not presented:
            return None
        # A lookup compares digests, not keys. Its timing can at most tell a caller how much of
        # the digest of their own guess matches a stored digest, which brings them no closer to a
        # key (SHA-256 is preimage resistant), so no constant-time loop over every key is needed.
        return self._principals.get(hash_api_key(presented))


def new_api_key() -> str:
    return secrets.token_urlsafe(32)


def valid_key_name(name: str) -> bool:
    return KEY_NAME_PATTERN.fullmatch(name) is not None


def accepted_principals(bootstrap: Mapping[str, Principal], table: TableKeys) -> dict[str, Principal]:
    """What a replica accepts: API_KEYS and the table's active keys, less every revoked digest (a
    revocation in the table wins over API_KEYS, which cannot change without a restart). A key of
    API_KEYS that the table registers too has the table's scopes: an operator narrowing a key
    must not be overruled by the environment."""
    merged = {**bootstrap, **table.active}
    return {digest: principal for digest, principal in merged.items() if digest not in table.revoked}


class ApiKeyTable(PostgresStore):
    SCHEMA_TABLE = "api_keys_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "api-keys"
    # A replica's refresh keeps the last key set when the server is away, so it need not wait long.
    POOL_MAX_SIZE = 2
    RETRY_FOR_S = 2.0
    POOL_TIMEOUT_S = 2.0

    async def add(
        self, name: str, key_hash: str, scopes: frozenset[Scope], models: frozenset[str] | None = None
    ) -> ApiKeyRecord:
        if not scopes:
            raise ValueError("a key needs at least one scope")

        async def op(conn: psycopg.AsyncConnection[Any]) -> ApiKeyRecord:
            async with self._transaction(conn) as cur:
                await cur.execute("SELECT 1 FROM api_keys WHERE name = %s", (name,))
                if await cur.fetchone() is not None:
                    raise KeyNameTakenError(name)
                await cur.execute("SELECT name FROM api_keys WHERE key_sha256 = %s", (key_hash,))
                if (existing := await cur.fetchone()) is not None:
                    raise KeyAlreadyStoredError(existing["name"])
                await cur.execute(
                    "INSERT INTO api_keys (name, key_sha256, scopes, models) VALUES (%s, %s, %s, %s) "
                    f"RETURNING {_COLUMNS}",
                    (name, key_hash, sorted(scopes), None if models is None else sorted(models)),
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
                    "UPDATE api_keys SET revoked_at = coalesce(revoked_at, now()) WHERE name = %s "
                    f"RETURNING {_COLUMNS}",
                    (name,),
                )
                row = await cur.fetchone()
                return None if row is None else _record(row)

        return await self._retrying(op)

    async def records(self) -> list[ApiKeyRecord]:
        async def op(conn: psycopg.AsyncConnection[Any]) -> list[ApiKeyRecord]:
            async with self._transaction(conn) as cur:
                await cur.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at, name")
                return [_record(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def keys(self) -> TableKeys:
        async def op(conn: psycopg.AsyncConnection[Any]) -> TableKeys:
            async with self._transaction(conn) as cur:
                await cur.execute(f"SELECT {_COLUMNS} FROM api_keys")
                rows = [_record(row) for row in await cur.fetchall()]
            return TableKeys(
                active={
                    r.key_hash: Principal(key_id=r.key_id, name=r.name, scopes=r.scopes, models=r.models)
                    for r in rows
                    if r.revoked_at is None
                },
                revoked=frozenset(r.key_hash for r in rows if r.revoked_at is not None),
            )

        return await self._retrying(op)


_COLUMNS = "name, key_sha256, scopes, models, created_at, revoked_at"


@dataclass(frozen=True)
class _Row(ApiKeyRecord):
    key_hash: str


def _record(row: dict[str, Any] | None) -> _Row:
    assert row is not None
    return _Row(
        name=row["name"],
        key_id=key_id_of(row["key_sha256"]),
        scopes=frozenset(Scope(s) for s in row["scopes"]),
        models=None if row["models"] is None else frozenset(row["models"]),
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
        key_hash=row["key_sha256"],
    )


class KeyRefresher:
    """Keeps a replica's `KeyStore` in step with the table, every `interval_s`, in the background."""

    def __init__(
        self, table: ApiKeyTable, store: KeyStore, bootstrap: Mapping[str, Principal], interval_s: float
    ) -> None:
        self._table = table
        self._store = store
        self._bootstrap = dict(bootstrap)
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
            table = await self._table.keys()
        except Exception as exc:
            # Warn when the database goes away, not on every interval while it stays away.
            if self._reachable:
                log.warning(
                    "API keys not refreshed (%s: %s); keeping the %d keys accepted so far",
                    type(exc).__name__,
                    exc,
                    len(self._store.principals),
                )
            self._reachable = False
            return False
        accepted = accepted_principals(self._bootstrap, table)
        if not self._reachable or accepted != self._store.principals:
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
    store: KeyStore, bootstrap: Mapping[str, Principal], database_url: str | None, interval_s: float
) -> KeyRefresher | None:
    """The replica's refresher; None without a database, where API_KEYS are the only keys."""
    if database_url is None:
        return None
    table = ApiKeyTable(database_url)
    refresher = KeyRefresher(table, store, bootstrap, interval_s)
    await refresher.start(FIRST_REFRESH_TIMEOUT_S)
    return refresher
