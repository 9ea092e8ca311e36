"""The rollout service's state in PostgreSQL: rollouts (shadow, canary, probation), their events,
and the champion each model had when the service last looked.

The rows are the source of truth: the service survives its restarts and the replicas' by reading
them, and every change is a guarded UPDATE (the rollout must still be active, a canary at the step
it was judged at), so a second service that lost its leadership late can never move one backwards.
One active shadow/canary rollout and one active probation per model are enforced by partial
unique indexes. Which process drives the rollouts is decided by `Leadership`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from core.database import PostgresStore, plain_dsn
from services.rollout.models import RolloutEvent, RolloutKind, RolloutOverview, RolloutRecord, RolloutState

log = logging.getLogger(__name__)

MIGRATIONS: list[str] = [
    """
    CREATE TABLE rollouts (
        id bigserial PRIMARY KEY,
        model_name text NOT NULL,
        kind text NOT NULL CHECK (kind IN ('shadow', 'canary', 'probation')),
        state text NOT NULL CHECK (state IN
            ('active', 'promoted', 'rejected', 'passed', 'inconclusive', 'rolled_back', 'ended')),
        champion_version text NOT NULL,
        challenger_version text NOT NULL,
        step integer NOT NULL DEFAULT 0,
        share double precision NOT NULL DEFAULT 0 CHECK (share >= 0 AND share <= 1),
        policy jsonb NOT NULL DEFAULT '{}'::jsonb,
        job_id text,
        started_at timestamptz NOT NULL DEFAULT now(),
        step_started_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        ended_at timestamptz,
        reason text,
        figures jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE UNIQUE INDEX rollouts_one_active_rollout ON rollouts (model_name)
        WHERE state = 'active' AND kind IN ('shadow', 'canary');
    CREATE UNIQUE INDEX rollouts_one_active_probation ON rollouts (model_name)
        WHERE state = 'active' AND kind = 'probation';
    CREATE INDEX rollouts_model ON rollouts (model_name, id DESC);
    CREATE INDEX rollouts_challenger ON rollouts (model_name, challenger_version);
    CREATE INDEX rollouts_rolled_back ON rollouts (model_name, ended_at) WHERE state = 'rolled_back';
    CREATE TABLE rollout_events (
        id bigserial PRIMARY KEY,
        rollout_id bigint NOT NULL REFERENCES rollouts (id) ON DELETE CASCADE,
        at timestamptz NOT NULL DEFAULT now(),
        kind text NOT NULL,
        message text NOT NULL,
        figures jsonb NOT NULL DEFAULT '{}'::jsonb
    );
    CREATE INDEX rollout_events_rollout ON rollout_events (rollout_id, id);
    CREATE TABLE champion_history (
        id bigserial PRIMARY KEY,
        model_name text NOT NULL,
        version text NOT NULL,
        previous text,
        since timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX champion_history_model ON champion_history (model_name, id DESC);
    """,
]

_ROLLOUT_KINDS = ("shadow", "canary")
# What GET /v1/models/{name} shows of a rollout's history.
OVERVIEW_EVENTS = 20


@dataclass(frozen=True)
class ChampionSeen:
    """The champion a model had when the service last looked, and the one before it."""

    model_name: str
    version: str
    previous: str | None
    since: datetime


def _record(row: dict[str, Any]) -> RolloutRecord:
    return RolloutRecord.model_validate(row)


def _event(row: dict[str, Any]) -> RolloutEvent:
    return RolloutEvent.model_validate(row)


# Inserting a rollout and its first event in one statement: the event exists whenever the row does.
_INSERT = """
    WITH rollout AS (
        INSERT INTO rollouts (model_name, kind, state, champion_version, challenger_version, step, share,
            policy, job_id, reason, figures, ended_at)
        VALUES (%(model)s, %(kind)s, %(state)s, %(champion)s, %(challenger)s, 0, %(share)s, %(policy)s,
            %(job_id)s, %(reason)s, %(figures)s, CASE WHEN %(state)s::text = 'active' THEN NULL ELSE now() END)
        ON CONFLICT DO NOTHING
        RETURNING *
    ), event AS (
        INSERT INTO rollout_events (rollout_id, kind, message, figures)
        SELECT id, %(event)s, %(message)s, %(figures)s FROM rollout
    )
    SELECT * FROM rollout
"""


class RolloutStore(PostgresStore):
    SCHEMA_TABLE = "rollout_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "rollout"
    # Replicas read it on every poll and the API on every GET: fail fast (they show no rollout
    # and try again) rather than hold a request while the server is away.
    RETRY_FOR_S = 2.0
    POOL_TIMEOUT_S = 2.0

    # Read by the replicas and the API ------------------------------------------------------------

    async def serving_rollouts(self) -> list[RolloutRecord]:
        """The active shadow and canary rollouts: what the replicas load, route and mirror."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[RolloutRecord]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT * FROM rollouts WHERE state = 'active' AND kind IN ('shadow', 'canary') ORDER BY model_name"
                )
                return [_record(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def overview(self, model_name: str) -> RolloutOverview:
        """The active (else the latest) rollout and probation of a model, and their latest events."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutOverview:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    """
                    SELECT DISTINCT ON (kind = 'probation') * FROM rollouts WHERE model_name = %s
                    ORDER BY kind = 'probation', state = 'active' DESC, id DESC
                    """,
                    (model_name,),
                )
                found = [_record(row) for row in await cur.fetchall()]
                rollout = next((r for r in found if r.kind != "probation"), None)
                probation = next((r for r in found if r.kind == "probation"), None)
                events: list[RolloutEvent] = []
                if found:
                    await cur.execute(
                        """
                        SELECT rollout_id, at, kind, message, figures FROM rollout_events
                        WHERE rollout_id = ANY(%s) ORDER BY at DESC, id DESC LIMIT %s
                        """,
                        ([r.id for r in found], OVERVIEW_EVENTS),
                    )
                    events = [_event(row) for row in await cur.fetchall()]
            return RolloutOverview(rollout=rollout, probation=probation, events=events)

        return await self._retrying(op)

    # Read by the service -------------------------------------------------------------------------

    async def clock(self) -> datetime:
        """The database's time: prediction rows are stamped by it, so windows are measured by it."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> datetime:
            cur = await conn.execute("SELECT now()")
            found = await cur.fetchone()
            assert found is not None
            value: datetime = found[0]
            return value

        return await self._retrying(op)

    async def get(self, rollout_id: int) -> RolloutRecord | None:
        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutRecord | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SELECT * FROM rollouts WHERE id = %s", (rollout_id,))
                row = await cur.fetchone()
                return None if row is None else _record(row)

        return await self._retrying(op)

    async def active(self) -> list[RolloutRecord]:
        """Every active rollout and probation, oldest first."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[RolloutRecord]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute("SELECT * FROM rollouts WHERE state = 'active' ORDER BY id")
                return [_record(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def decided(self, model_name: str, version: str) -> RolloutRecord | None:
        """The latest shadow/canary rollout of this version that ended promoted or rejected."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutRecord | None:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    """
                    SELECT * FROM rollouts
                    WHERE model_name = %s AND challenger_version = %s AND kind IN ('shadow', 'canary')
                        AND state IN ('promoted', 'rejected')
                    ORDER BY id DESC LIMIT 1
                    """,
                    (model_name, version),
                )
                row = await cur.fetchone()
                return None if row is None else _record(row)

        return await self._retrying(op)

    async def events(self, rollout_id: int) -> list[RolloutEvent]:
        """A rollout's events, oldest first."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[RolloutEvent]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    """
                    SELECT rollout_id, at, kind, message, figures FROM rollout_events
                    WHERE rollout_id = %s ORDER BY id
                    """,
                    (rollout_id,),
                )
                return [_event(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def latest_rollbacks(self) -> list[RolloutRecord]:
        """Per model, its latest probation that ended in a rollback."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[RolloutRecord]:
            async with conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    """
                    SELECT DISTINCT ON (model_name) * FROM rollouts WHERE state = 'rolled_back'
                    ORDER BY model_name, ended_at DESC, id DESC
                    """
                )
                return [_record(row) for row in await cur.fetchall()]

        return await self._retrying(op)

    async def champions(self) -> dict[str, ChampionSeen]:
        """Per model, the champion the service saw last."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> dict[str, ChampionSeen]:
            cur = await conn.execute(
                """
                SELECT DISTINCT ON (model_name) model_name, version, previous, since FROM champion_history
                ORDER BY model_name, id DESC
                """
            )
            return {str(name): ChampionSeen(str(name), str(v), p, since) for name, v, p, since in await cur.fetchall()}

        return await self._retrying(op)

    # Written by the service ----------------------------------------------------------------------

    async def start(
        self,
        model_name: str,
        kind: RolloutKind,
        champion_version: str,
        challenger_version: str,
        *,
        share: float = 0.0,
        policy: dict[str, Any] | None = None,
        job_id: str | None = None,
        message: str,
        state: RolloutState = RolloutState.ACTIVE,
        figures: dict[str, Any] | None = None,
    ) -> RolloutRecord | None:
        """A new rollout or probation with its first event. None when the model already has an
        active one of that kind. With another `state`, a rollout that ended as it began (a
        challenger refused on adoption), kept so that its decision shows with the others."""
        params = {
            "model": model_name,
            "kind": kind,
            "state": state.value,
            "champion": champion_version,
            "challenger": challenger_version,
            "share": share,
            "policy": Jsonb(policy or {}),
            "job_id": job_id,
            "reason": None if state is RolloutState.ACTIVE else message,
            "figures": Jsonb(figures or {}),
            "event": "started" if state is RolloutState.ACTIVE else state.value,
            "message": message,
        }

        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(_INSERT, params)
                row = await cur.fetchone()
                return None if row is None else _record(row)

        return await self._retrying(op)

    async def save_figures(self, rollout_id: int, figures: dict[str, Any]) -> bool:
        """The current window's figures of an active rollout (shown while it runs)."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> bool:
            cur = await conn.execute(
                "UPDATE rollouts SET figures = %s, updated_at = now() WHERE id = %s AND state = 'active'",
                (Jsonb(figures), rollout_id),
            )
            return cur.rowcount == 1

        return await self._retrying(op)

    async def advance(
        self, rollout_id: int, from_step: int, share: float, message: str, figures: dict[str, Any]
    ) -> RolloutRecord | None:
        """A canary's next step: the share it answers grows and a new window starts now. None when
        the rollout is no longer active at `from_step` (another hand moved it first)."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE rollouts SET step = step + 1, share = %s, step_started_at = now(), updated_at = now(),
                        figures = '{}'::jsonb
                    WHERE id = %s AND state = 'active' AND step = %s
                    RETURNING *
                    """,
                    (share, rollout_id, from_step),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                await cur.execute(
                    "INSERT INTO rollout_events (rollout_id, kind, message, figures) VALUES (%s, 'step', %s, %s)",
                    (rollout_id, message, Jsonb(figures)),
                )
                return _record(row)

        return await self._retrying(op)

    async def finish(
        self, rollout_id: int, state: RolloutState, reason: str, figures: dict[str, Any] | None = None
    ) -> RolloutRecord | None:
        """End an active rollout or probation with its outcome and the figures it was decided on;
        an event of the outcome's name. None when it had already ended."""
        if state is RolloutState.ACTIVE:
            raise ValueError("finish() ends a rollout: give the state it ends in")

        async def op(conn: psycopg.AsyncConnection[Any]) -> RolloutRecord | None:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    UPDATE rollouts SET state = %s, reason = %s, figures = coalesce(%s, figures), share = 0,
                        ended_at = now(), updated_at = now()
                    WHERE id = %s AND state = 'active'
                    RETURNING *
                    """,
                    (state.value, reason, None if figures is None else Jsonb(figures), rollout_id),
                )
                row = await cur.fetchone()
                if row is None:
                    return None
                await cur.execute(
                    "INSERT INTO rollout_events (rollout_id, kind, message, figures) VALUES (%s, %s, %s, %s)",
                    (rollout_id, state.value, reason, Jsonb(figures or {})),
                )
                return _record(row)

        return await self._retrying(op)

    async def record_champion(self, model_name: str, version: str, previous: str | None) -> None:
        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                "INSERT INTO champion_history (model_name, version, previous) VALUES (%s, %s, %s)",
                (model_name, version, previous),
            )

        await self._retrying(op)


class Leadership:
    """One rollout service among the dispatchers: the holder of a session-level advisory lock, on
    a connection of its own. The lock lives as long as that session: a connection the server or
    the network dropped is leadership lost (the server releases the lock), and a stand-by takes
    it on its next try. Each call of `hold` checks the session is alive before it answers yes."""

    LOCK_NAME = "rollout-service"

    def __init__(self, dsn: str, connect_timeout_s: float = 5.0) -> None:
        self._dsn = plain_dsn(dsn)
        self._connect_timeout_s = connect_timeout_s
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.leading = False

    async def hold(self) -> bool:
        """True while this process is the leader: keeps it (checking its session), or tries to
        become it. Never raises for a database that cannot be reached: that is not leading."""
        try:
            if self._conn is None or self._conn.closed:
                self.leading = False
                self._conn = await psycopg.AsyncConnection.connect(
                    self._dsn,
                    autocommit=True,
                    connect_timeout=max(1, round(self._connect_timeout_s)),
                    application_name="rollout-leader",
                )
            # Bounded: a session whose server went silent must not hold the tick (or the belief
            # that it still leads) for as long as TCP takes to give up.
            await asyncio.wait_for(self._check_or_take(self._conn), self._connect_timeout_s)
        except (psycopg.Error, TimeoutError) as exc:
            if self.leading:
                log.warning("rollout service: leadership lost (%s)", exc or type(exc).__name__)
            self.leading = False  # a broken session has nothing to unlock
            await self.release()
        return self.leading

    async def _check_or_take(self, conn: psycopg.AsyncConnection[Any]) -> None:
        if self.leading:
            await conn.execute("SELECT 1")
            return
        cur = await conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (self.LOCK_NAME,))
        found = await cur.fetchone()
        self.leading = bool(found and found[0])
        if self.leading:
            log.info("rollout service: leading")

    async def release(self) -> None:
        """Give the leadership up. The lock is unlocked before the session closes: the server
        drops a closed session's locks only once its backend has exited, which a stand-by trying
        at once could beat."""
        leading, self.leading = self.leading, False
        conn, self._conn = self._conn, None
        if conn is None or conn.closed:
            return
        with contextlib.suppress(psycopg.Error, TimeoutError):
            if leading:
                await asyncio.wait_for(
                    conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (self.LOCK_NAME,)),
                    self._connect_timeout_s,
                )
        with contextlib.suppress(psycopg.Error):
            await conn.close()
