"""Predictions and feedback in PostgreSQL.

Every served prediction row is kept (request id, row index, model version, predicted label,
features) so that a true label sent later can be checked against it, counted towards the live
accuracy of the version that made it, and exported as training data.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import psycopg

from core.database import PostgresStore

MIGRATIONS: list[str] = [
    """
    CREATE TABLE predictions (
        request_id text NOT NULL,
        row_index integer NOT NULL,
        model_name text NOT NULL,
        model_version text NOT NULL,
        label text,
        probability double precision,
        features jsonb NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (request_id, row_index)
    );
    CREATE INDEX predictions_created ON predictions (created_at);
    CREATE TABLE feedback (
        request_id text NOT NULL,
        row_index integer NOT NULL,
        label text NOT NULL,
        correct boolean NOT NULL,
        model_name text NOT NULL,
        model_version text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (request_id, row_index),
        FOREIGN KEY (request_id, row_index) REFERENCES predictions ON DELETE CASCADE
    );
    CREATE INDEX feedback_created ON feedback (created_at);
    """,
]


@dataclass(frozen=True)
class PredictionRow:
    request_id: str
    row_index: int
    model_name: str
    model_version: str
    label: str | None
    probability: float | None
    features: dict[str, Any]


class FeedbackOutcome(enum.StrEnum):
    RECORDED = "recorded"
    DUPLICATE = "duplicate"
    UNKNOWN = "unknown"
    EXPIRED = "expired"


@dataclass(frozen=True)
class FeedbackResult:
    outcome: FeedbackOutcome
    correct: bool | None = None
    predicted: str | None = None
    label: str | None = None
    model_name: str | None = None
    model_version: str | None = None
    predicted_at: datetime | None = None


@dataclass(frozen=True)
class VersionAccuracy:
    model_name: str
    model_version: str
    feedback: int
    correct: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.feedback if self.feedback else 0.0


class FeedbackStore(PostgresStore):
    SCHEMA_TABLE = "feedback_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "feedback"
    # Requests wait on it: fail fast (feedback answers 503; the recorder keeps unflushed rows
    # for its next flush) rather than hold them while the server is away.
    RETRY_FOR_S = 2.0
    POOL_TIMEOUT_S = 2.0

    async def record_predictions(self, rows: Sequence[PredictionRow]) -> None:
        """One statement per batch; a request id seen before (a client reusing X-Request-ID)
        keeps its first prediction."""
        if not rows:
            return
        # The whole batch as one JSON document, encoded in C by orjson and unpacked by PostgreSQL:
        # psycopg's array parameters are quoted element by element in Python, which cost the
        # serving loop more than the prediction itself (py-spy, benchmarks/README.md).
        document = orjson.dumps(
            [
                {
                    "r": row.request_id,
                    "i": row.row_index,
                    "n": row.model_name,
                    "v": row.model_version,
                    "l": row.label,
                    "p": row.probability,
                    "f": row.features,
                }
                for row in rows
            ],
            default=str,
        ).decode()

        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                """
                INSERT INTO predictions
                    (request_id, row_index, model_name, model_version, label, probability, features)
                SELECT r, i, n, v, l, p, f
                FROM jsonb_to_recordset(%s::jsonb)
                    AS t(r text, i int, n text, v text, l text, p float8, f jsonb)
                ON CONFLICT DO NOTHING
                """,
                (document,),
            )

        await self._retrying(op)

    async def predicted_by(self, request_id: str, row_index: int) -> str | None:
        """The registered model that made this prediction (whose classes a label must be one of),
        or None for an unknown row."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> str | None:
            cur = await conn.execute(
                "SELECT model_name FROM predictions WHERE request_id = %s AND row_index = %s",
                (request_id, row_index),
            )
            found = await cur.fetchone()
            return None if found is None else str(found[0])

        return await self._retrying(op)

    async def add_feedback(self, request_id: str, row_index: int, label: str, max_age_s: float) -> FeedbackResult:
        """Store a true label once. The first label for a row wins; repeats change nothing."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> FeedbackResult:
            async with self._transaction(conn) as cur:
                await cur.execute(
                    """
                    SELECT p.model_name, p.model_version, p.label, p.created_at,
                           p.created_at < now() - make_interval(secs => %s) AS expired,
                           f.label AS given, f.correct AS given_correct
                    FROM predictions p LEFT JOIN feedback f USING (request_id, row_index)
                    WHERE p.request_id = %s AND p.row_index = %s
                    """,
                    (max_age_s, request_id, row_index),
                )
                found = await cur.fetchone()
                if found is None:
                    return FeedbackResult(FeedbackOutcome.UNKNOWN)
                common = {
                    "predicted": found["label"],
                    "model_name": found["model_name"],
                    "model_version": found["model_version"],
                    "predicted_at": found["created_at"],
                }
                if found["given"] is not None:
                    return FeedbackResult(
                        FeedbackOutcome.DUPLICATE, found["given_correct"], label=found["given"], **common
                    )
                if found["expired"]:
                    return FeedbackResult(FeedbackOutcome.EXPIRED, **common)
                correct = found["label"] == label
                await cur.execute(
                    """
                    INSERT INTO feedback (request_id, row_index, label, correct, model_name, model_version)
                    VALUES (%s, %s, %s, %s, %s, %s)
                    ON CONFLICT DO NOTHING RETURNING correct
                    """,
                    (request_id, row_index, label, correct, found["model_name"], found["model_version"]),
                )
                if await cur.fetchone() is None:  # a concurrent request stored it first
                    return FeedbackResult(FeedbackOutcome.DUPLICATE, label=label, **common)
                return FeedbackResult(FeedbackOutcome.RECORDED, correct, label=label, **common)

        return await self._retrying(op)

    async def live_accuracy(self, window_s: float) -> list[VersionAccuracy]:
        """Feedback of the last window per model version, by the time the label arrived."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[VersionAccuracy]:
            cur = await conn.execute(
                """
                SELECT model_name, model_version, count(*) AS n, count(*) FILTER (WHERE correct) AS ok
                FROM feedback WHERE created_at > now() - make_interval(secs => %s)
                GROUP BY model_name, model_version ORDER BY model_name, model_version
                """,
                (window_s,),
            )
            return [VersionAccuracy(str(n), str(v), int(c), int(ok)) for n, v, c, ok in await cur.fetchall()]

        return await self._retrying(op)

    async def labelled_rows(self, since: datetime | None, limit: int) -> list[tuple[dict[str, Any], str, datetime]]:
        """(features, true label, time) of rows with feedback, oldest first: new training data."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[tuple[dict[str, Any], str, datetime]]:
            cur = await conn.execute(
                """
                SELECT p.features, f.label, f.created_at
                FROM feedback f JOIN predictions p USING (request_id, row_index)
                WHERE %s::timestamptz IS NULL OR f.created_at > %s
                ORDER BY f.created_at LIMIT %s
                """,
                (since, since, limit),
            )
            return [(dict(features), str(label), at) for features, label, at in await cur.fetchall()]

        return await self._retrying(op)
