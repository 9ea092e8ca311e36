"""PostgreSQL access shared by the platform's stores: a pool that survives server restarts,
retries with backoff while the server is away, and versioned schema migrations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Self, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential_jitter

log = logging.getLogger(__name__)
T = TypeVar("T")

# Connection problems that go away when the server comes back.
TRANSIENT_DB_ERRORS: tuple[type[Exception], ...] = (psycopg.OperationalError, PoolTimeout)


def plain_dsn(url: str) -> str:
    """psycopg takes libpq URLs; SQLAlchemy-style `postgresql+psycopg://` is accepted too."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


class PostgresStore:
    """Base of a store: subclasses name their schema table, list their migrations and, where they
    differ from the defaults here, size their pool and name their connections."""

    SCHEMA_TABLE: ClassVar[str]
    MIGRATIONS: ClassVar[Sequence[str]]
    APPLICATION_NAME: ClassVar[str] = "ray-cluster"  # shows in pg_stat_activity
    POOL_MAX_SIZE: ClassVar[int] = 4
    RETRY_FOR_S: ClassVar[float] = 300.0
    POOL_TIMEOUT_S: ClassVar[float] = 5.0

    def __init__(
        self,
        dsn: str,
        max_size: int | None = None,
        retry_for_s: float | None = None,
        pool_timeout_s: float | None = None,
    ) -> None:
        self._pool = AsyncConnectionPool(
            plain_dsn(dsn),
            min_size=1,
            max_size=self.POOL_MAX_SIZE if max_size is None else max_size,
            open=False,
            timeout=self.POOL_TIMEOUT_S if pool_timeout_s is None else pool_timeout_s,
            kwargs={"autocommit": True, "connect_timeout": 5, "application_name": self.APPLICATION_NAME},
            # A connection the server dropped (restart, failover) is replaced before it is handed out.
            check=AsyncConnectionPool.check_connection,
            reconnect_timeout=0,  # keep trying to refill the pool however long the server is away
        )
        self._retry_for_s = self.RETRY_FOR_S if retry_for_s is None else retry_for_s

    async def open(self) -> None:
        await self._pool.open(wait=False)

    async def close(self) -> None:
        await self._pool.close()

    async def run_once(self, op: Callable[[Self], Awaitable[T]]) -> T:
        """Open, bring the schema up to date, run op, close: what a one-shot CLI command needs."""
        await self.open()
        try:
            await self.migrate()
            return await op(self)
        finally:
            await self.close()

    async def _retrying(self, op: Callable[[psycopg.AsyncConnection[Any]], Awaitable[T]]) -> T:
        """Run op on a pooled connection; retry with backoff while the database is unreachable."""
        async for attempt in AsyncRetrying(
            retry=retry_if_exception_type(TRANSIENT_DB_ERRORS),
            wait=wait_exponential_jitter(initial=0.2, max=10),
            stop=stop_after_delay(self._retry_for_s),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "database unavailable (%s); retrying", state.outcome.exception() if state.outcome else "?"
            ),
        ):
            with attempt:
                async with self._pool.connection() as conn:
                    return await op(conn)
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying reraises

    @asynccontextmanager
    async def _transaction(self, conn: psycopg.AsyncConnection[Any]) -> AsyncIterator[psycopg.AsyncCursor[Any]]:
        async with conn.transaction(), conn.cursor(row_factory=dict_row) as cur:
            yield cur

    async def migrate(self) -> None:
        table = psycopg.sql.Identifier(self.SCHEMA_TABLE)

        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            async with self._transaction(conn) as cur:
                # One migrator at a time when several processes start together.
                await cur.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (self.SCHEMA_TABLE,))
                await cur.execute(
                    psycopg.sql.SQL("CREATE TABLE IF NOT EXISTS {} (version integer NOT NULL)").format(table)
                )
                await cur.execute(psycopg.sql.SQL("SELECT coalesce(max(version), 0) AS v FROM {}").format(table))
                row = await cur.fetchone()
                current = int(row["v"]) if row else 0
                for version, statement in enumerate(self.MIGRATIONS[current:], start=current + 1):
                    await cur.execute(statement)
                    await cur.execute(psycopg.sql.SQL("INSERT INTO {} (version) VALUES (%s)").format(table), (version,))

        await self._retrying(op)
