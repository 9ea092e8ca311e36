"""Predictions, feedback and model monitoring reports in PostgreSQL.

Every served prediction row is kept (request id, row index, model version, predicted label,
features, the model's output) so that a true label sent later can be checked against it, counted
towards the live accuracy of the version that made it, and exported as training data; the live
monitor (services/monitoring/live.py) judges the recent rows of each version for drift, stores its
latest report per version here, and deletes rows past their retention.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
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
    # The model's output with each row (NULL for rows recorded before); the index serves the
    # monitor's most recent rows of one version.
    """
    ALTER TABLE predictions ADD COLUMN output jsonb;
    CREATE INDEX predictions_version_created ON predictions (model_name, model_version, created_at);
    """,
    # The live monitor's latest report per version (what GET /v1/models/{name}/monitoring shows).
    """
    CREATE TABLE model_monitoring (
        model_name text NOT NULL,
        model_version text NOT NULL,
        computed_at timestamptz NOT NULL DEFAULT now(),
        report jsonb NOT NULL,
        PRIMARY KEY (model_name, model_version)
    );
    """,
    # Rows scored by the version that did not answer (a shadow challenger, or the champion behind
    # a canary's answer), kept apart from `predictions` so that both answers of a request are
    # stored and the served one keeps its key; the rollout service pairs them (services/rollout).
    """
    CREATE TABLE shadow_predictions (
        request_id text NOT NULL,
        row_index integer NOT NULL,
        model_name text NOT NULL,
        model_version text NOT NULL,
        label text,
        probability double precision,
        output jsonb,
        rollout_id bigint,
        created_at timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (request_id, row_index, model_version)
    );
    CREATE INDEX shadow_predictions_created ON shadow_predictions (model_name, created_at);
    """,
    # A recorded row's features and output as json, not jsonb: PostgreSQL checks json and keeps its
    # text, where jsonb parses every document into its binary form, a large share of the server's
    # CPU per recorded row, and recording must keep up with the bulk requests' rows on the same cores.
    # The rows are only ever read whole or with ->> (json_agg, the feedback and monitoring queries
    # here), which json serves alike. (The table is rewritten once, under lock: the replicas buffer.)
    """
    ALTER TABLE predictions
        ALTER COLUMN features TYPE json USING features::json,
        ALTER COLUMN output TYPE json USING output::json;
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
    # What the model answered: {"probabilities": {class: p}} (classification) or {"value": v}.
    output: dict[str, Any] | None = None


# The columns of a `PredictionBatch`'s COPY lines, in order (PostgreSQL's text format: fields
# separated by tabs, \N for null, backslashes doubled; `copy_text` escapes a text field).
PREDICTION_COPY_COLUMNS = (
    "request_id",
    "row_index",
    "model_name",
    "model_version",
    "label",
    "probability",
    "output",
    "features",
)


def copy_text(value: str) -> bytes:
    """A text field in PostgreSQL's COPY text format."""
    return value.encode().replace(b"\\", b"\\\\").replace(b"\t", b"\\t").replace(b"\n", b"\\n").replace(b"\r", b"\\r")


@dataclass(frozen=True, slots=True)
class PredictionBatch:
    """The served predictions of one request, recorded whole: the request path keeps a reference
    to what it already has (the validated columns, the model's outputs) and builds no object per
    row; `lines` writes the rows as COPY lines (`PREDICTION_COPY_COLUMNS`) from row `skip` on,
    when the recorder flushes. `skip`: rows left out from the front (the recorder's bound dropped
    them); the others keep their row index in the request."""

    request_id: str
    model_name: str
    model_version: str
    rows: int
    lines: Callable[[int], bytes]
    skip: int = 0

    def __len__(self) -> int:
        return self.rows - self.skip

    def without_first(self, rows: int) -> PredictionBatch:
        return replace(self, skip=self.skip + rows)


@dataclass(frozen=True)
class ShadowRow:
    """A row scored by the version that did not answer the request, after the answer was sent:
    the same request id and row index as the served row in `predictions`."""

    request_id: str
    row_index: int
    model_name: str
    model_version: str
    label: str | None
    probability: float | None
    output: dict[str, Any] | None
    rollout_id: int | None


@dataclass(frozen=True)
class PairedFigures:
    """Served rows of a rollout's two versions that have their mirror (the other version's answer
    to the same row), since a time: what the rollout rule judges (docs/rollout.md).

    Counts only; the shares are properties, None where nothing was counted."""

    rows: int
    requests: int
    agreeing: int
    # Paired rows with a true label (classification only), and how often each version was right
    # on those same rows.
    labelled: int
    champion_correct: int
    challenger_correct: int
    challenger_served_rows: int
    # Rows whose champion answer is a value, not a label: agreement is then by tolerance.
    regression_rows: int = 0

    @property
    def agreement(self) -> float | None:
        return self.agreeing / self.rows if self.rows else None

    @property
    def champion_accuracy(self) -> float | None:
        return self.champion_correct / self.labelled if self.labelled else None

    @property
    def challenger_accuracy(self) -> float | None:
        return self.challenger_correct / self.labelled if self.labelled else None

    @property
    def regression(self) -> bool:
        return self.rows > 0 and self.regression_rows == self.rows


@dataclass(frozen=True)
class VersionWindow:
    """Served predictions of one version made in a time range, and their feedback: what
    probation compares a new champion with the one it replaced by."""

    rows: int
    # Rows with a predicted label and a true one, and how many of those were right.
    labelled: int
    correct: int
    # Rows with a calibrated top-class probability, and its mean: the estimated accuracy.
    probability_rows: int = 0
    mean_probability: float | None = None

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.labelled if self.labelled else None

    @property
    def estimated_accuracy(self) -> float | None:
        return self.mean_probability if self.probability_rows else None


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


@dataclass(frozen=True)
class WindowVersion:
    """A model version with predictions in the monitor's window, and how many."""

    model_name: str
    model_version: str
    rows: int


@dataclass(frozen=True)
class WindowRows:
    """Recorded rows of one version: request features and the model's outputs, in the same order
    (an output is None for rows recorded before outputs were)."""

    features: list[dict[str, Any]]
    outputs: list[dict[str, Any] | None]

    @classmethod
    def parse(cls, document: str | bytes) -> WindowRows:
        """The rows of `FeedbackStore.window_document`."""
        pairs = orjson.loads(document)
        return cls(
            [dict(features) for features, _ in pairs],
            [output if isinstance(output, dict) else None for _, output in pairs],
        )


@dataclass(frozen=True)
class MonitoringRecord:
    model_name: str
    model_version: str
    computed_at: datetime
    report: dict[str, Any]


class FeedbackStore(PostgresStore):
    SCHEMA_TABLE = "feedback_schema"
    MIGRATIONS = MIGRATIONS
    APPLICATION_NAME = "feedback"
    # Requests wait on it: fail fast (feedback answers 503; the recorder keeps unflushed rows
    # for its next flush) rather than hold them while the server is away.
    RETRY_FOR_S = 2.0
    POOL_TIMEOUT_S = 2.0

    async def _insert_document(self, statement: str, document: str) -> None:
        """Rows as one JSON document (`_document`), unpacked by PostgreSQL's jsonb_to_recordset in
        `statement`."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(statement, (document,))

        await self._retrying(op)

    async def record_predictions(self, rows: Sequence[PredictionRow | PredictionBatch]) -> None:
        """Rows, and whole requests' batches, in one transaction; a request id seen before (a
        client reusing X-Request-ID, or a flush retried after its commit went unacknowledged)
        keeps its first prediction.

        Batches are one COPY into `predictions`: PostgreSQL inserts them a page at a time and
        parses each row's JSON once. A request id already recorded fails that COPY; the batches
        then go through a staging table and an INSERT that skips the rows already there."""
        if not rows:
            return
        batches = [row for row in rows if isinstance(row, PredictionBatch)]
        singles = [row for row in rows if isinstance(row, PredictionRow)]

        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            async with conn.transaction():
                if batches:
                    await self._copy_batches(conn, batches)
                if singles:
                    await conn.execute(INSERT_PREDICTION_ROWS, (prediction_rows_document(singles),))

        await self._retrying(op)

    async def _copy_batches(self, conn: psycopg.AsyncConnection[Any], batches: Sequence[PredictionBatch]) -> None:
        try:
            async with conn.transaction(), conn.cursor() as cur, cur.copy(_COPY_PREDICTIONS) as copy:
                await _write_lines(copy, batches)
            return
        except psycopg.errors.UniqueViolation:
            pass  # rolled back to the savepoint: nothing of this COPY is in
        # Created in this transaction if the session has none yet: remembering it per connection
        # would go wrong when the transaction that created it rolls back.
        await conn.execute(_STAGING_TABLE)
        async with conn.cursor() as cur:
            async with cur.copy(_COPY_STAGED) as copy:
                await _write_lines(copy, batches)
            await cur.execute(_INSERT_STAGED)

    async def record_shadow_predictions(self, rows: Sequence[ShadowRow]) -> None:
        """Mirrored rows, one statement per batch (as `record_predictions`); a row already scored
        by that version keeps its first answer."""
        if not rows:
            return
        await self._insert_document(_INSERT_SHADOW_ROWS, _document([_record(row, "x", row.rollout_id) for row in rows]))

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

    async def version_feedback(self, model_name: str, model_version: str, window_s: float) -> VersionAccuracy:
        """Feedback of the last window for one model version (what `live_accuracy` counts)."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> VersionAccuracy:
            cur = await conn.execute(
                """
                SELECT count(*), count(*) FILTER (WHERE correct) FROM feedback
                WHERE model_name = %s AND model_version = %s AND created_at > now() - make_interval(secs => %s)
                """,
                (model_name, model_version, window_s),
            )
            found = await cur.fetchone()
            total, ok = (int(found[0]), int(found[1])) if found else (0, 0)
            return VersionAccuracy(model_name, model_version, total, ok)

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

    # Live monitor ------------------------------------------------------------------------------

    async def delete_predictions_older_than(self, age_s: float, batch_rows: int, max_batches: int) -> int:
        """Delete predictions (their feedback cascades) recorded more than `age_s` ago, at most
        `batch_rows` per statement and `max_batches` statements: each batch is its own short
        transaction, so a large backlog neither holds locks long nor blocks the recorder's writes;
        what is left goes in the next call. Returns the rows deleted."""

        async def batch(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                """
                DELETE FROM predictions WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM predictions
                    WHERE created_at < now() - make_interval(secs => %s) LIMIT %s
                ))
                """,
                (age_s, batch_rows),
            )
            return cur.rowcount

        async def shadow_batch(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                """
                DELETE FROM shadow_predictions WHERE ctid = ANY(ARRAY(
                    SELECT ctid FROM shadow_predictions
                    WHERE created_at < now() - make_interval(secs => %s) LIMIT %s
                ))
                """,
                (age_s, batch_rows),
            )
            return cur.rowcount

        deleted = 0
        # Mirrored rows have no foreign key to their served row (either may be written first),
        # so they go by the same age in their own batches.
        for statement in (batch, shadow_batch):
            for _ in range(max_batches):
                rows = await self._retrying(statement)
                deleted += rows
                if rows < batch_rows:
                    break
        return deleted

    async def window_versions(self, window_s: float) -> list[WindowVersion]:
        """The model versions that made predictions in the last window, with their row counts."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[WindowVersion]:
            cur = await conn.execute(
                """
                SELECT model_name, model_version, count(*) FROM predictions
                WHERE created_at > now() - make_interval(secs => %s)
                GROUP BY model_name, model_version ORDER BY model_name, model_version
                """,
                (window_s,),
            )
            return [WindowVersion(str(n), str(v), int(c)) for n, v, c in await cur.fetchall()]

        return await self._retrying(op)

    async def window_document(self, model_name: str, model_version: str, window_s: float, limit: int) -> str:
        """The `limit` most recent rows of one version in the last window, newest first, as one JSON
        document `[[features, output], ...]` (`WindowRows.parse` reads it): unparsed, so that the
        caller can decode thousands of rows off its event loop."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> str:
            cur = await conn.execute(
                """
                SELECT coalesce(json_agg(json_build_array(features, output) ORDER BY created_at DESC), '[]')::text
                FROM (
                    SELECT features, output, created_at FROM predictions
                    WHERE model_name = %s AND model_version = %s
                        AND created_at > now() - make_interval(secs => %s)
                    ORDER BY created_at DESC LIMIT %s
                ) recent
                """,
                (model_name, model_version, window_s, limit),
            )
            found = await cur.fetchone()
            return str(found[0]) if found else "[]"

        return await self._retrying(op)

    async def save_monitoring(self, model_name: str, model_version: str, report: dict[str, Any]) -> None:
        """The latest monitoring report of a version, replacing the one before."""
        document = orjson.dumps(report, default=str).decode()

        async def op(conn: psycopg.AsyncConnection[Any]) -> None:
            await conn.execute(
                """
                INSERT INTO model_monitoring (model_name, model_version, computed_at, report)
                VALUES (%s, %s, now(), %s::jsonb)
                ON CONFLICT (model_name, model_version)
                DO UPDATE SET computed_at = excluded.computed_at, report = excluded.report
                """,
                (model_name, model_version, document),
            )

        await self._retrying(op)

    async def monitored_with_rows(self) -> list[tuple[str, str]]:
        """The versions whose latest stored report counted rows in its window."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[tuple[str, str]]:
            cur = await conn.execute(
                """
                SELECT model_name, model_version FROM model_monitoring
                WHERE coalesce((report->>'window_rows')::int, 0) > 0 ORDER BY model_name, model_version
                """
            )
            return [(str(n), str(v)) for n, v in await cur.fetchall()]

        return await self._retrying(op)

    async def monitoring_report(self, model_name: str, model_version: str) -> MonitoringRecord | None:
        """The latest stored report of a version; None when the monitor has not judged it yet."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> MonitoringRecord | None:
            cur = await conn.execute(
                "SELECT computed_at, report FROM model_monitoring WHERE model_name = %s AND model_version = %s",
                (model_name, model_version),
            )
            found = await cur.fetchone()
            if found is None:
                return None
            return MonitoringRecord(model_name, model_version, found[0], dict(found[1]))

        return await self._retrying(op)

    async def labels_since(self, model_name: str, since: datetime) -> int:
        """Labels of a registered model's predictions that arrived after `since`."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> int:
            cur = await conn.execute(
                "SELECT count(*) FROM feedback WHERE model_name = %s AND created_at > %s", (model_name, since)
            )
            found = await cur.fetchone()
            return int(found[0]) if found else 0

        return await self._retrying(op)

    async def labelled_rows_of_model(self, model_name: str, limit: int) -> list[tuple[dict[str, Any], str, datetime]]:
        """(features as recorded, true label, time of the label) of the `limit` most recently
        labelled predictions of a registered model, whichever of its versions made them, newest
        first: the rows a feedback snapshot exports for retraining that model."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> list[tuple[dict[str, Any], str, datetime]]:
            cur = await conn.execute(
                """
                SELECT p.features, f.label, f.created_at
                FROM feedback f JOIN predictions p USING (request_id, row_index)
                WHERE f.model_name = %s
                ORDER BY f.created_at DESC, f.request_id DESC, f.row_index DESC LIMIT %s
                """,
                (model_name, limit),
            )
            return [(dict(features), str(label), at) for features, label, at in await cur.fetchall()]

        return await self._retrying(op)

    # Rollouts ----------------------------------------------------------------------------------

    async def paired_figures(
        self, model_name: str, champion: str, challenger: str, since: datetime, regression_tolerance: float
    ) -> PairedFigures:
        """Figures of the rows served since `since` by either version that the other one scored
        too (shadow: the champion answered, the challenger mirrored; canary: both ways). Counted
        in PostgreSQL: a window may hold many thousands of rows."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> PairedFigures:
            cur = await conn.execute(
                _PAIRED_FIGURES,
                {
                    "model": model_name,
                    "champion": champion,
                    "challenger": challenger,
                    "since": since,
                    "tolerance": regression_tolerance,
                },
            )
            found = await cur.fetchone()
            if found is None:  # pragma: no cover - an aggregate always returns a row
                return PairedFigures(0, 0, 0, 0, 0, 0, 0)
            return PairedFigures(*(int(value) for value in found))

        return await self._retrying(op)

    async def version_window(
        self, model_name: str, model_version: str, start: datetime, end: datetime
    ) -> VersionWindow:
        """Figures of one version's served predictions made in [start, end], with their feedback."""

        async def op(conn: psycopg.AsyncConnection[Any]) -> VersionWindow:
            cur = await conn.execute(
                """
                SELECT count(*),
                       count(f.request_id) FILTER (WHERE p.label IS NOT NULL),
                       count(*) FILTER (WHERE f.correct AND p.label IS NOT NULL),
                       count(p.probability),
                       avg(p.probability)
                FROM predictions p LEFT JOIN feedback f USING (request_id, row_index)
                WHERE p.model_name = %s AND p.model_version = %s AND p.created_at >= %s AND p.created_at <= %s
                """,
                (model_name, model_version, start, end),
            )
            found = await cur.fetchone()
            if found is None:  # pragma: no cover - an aggregate always returns a row
                return VersionWindow(0, 0, 0)
            rows, labelled, correct, probability_rows, mean = found
            return VersionWindow(
                int(rows), int(labelled), int(correct), int(probability_rows), None if mean is None else float(mean)
            )

        return await self._retrying(op)


# A served row and its mirror share request id and row index; which of the two is the champion's
# depends on which version answered (a canary's share is answered by the challenger).
_PAIRED_FIGURES = """
    WITH pairs AS (
        SELECT p.request_id,
               p.model_version = %(challenger)s AS challenger_served,
               CASE WHEN p.model_version = %(champion)s THEN p.label ELSE s.label END AS champion_label,
               CASE WHEN p.model_version = %(champion)s THEN s.label ELSE p.label END AS challenger_label,
               -- ->> inside the CASE: served rows hold json, mirrored rows jsonb.
               (CASE WHEN p.model_version = %(champion)s THEN p.output ->> 'value'
                     ELSE s.output ->> 'value' END)::float8
                   AS champion_value,
               (CASE WHEN p.model_version = %(champion)s THEN s.output ->> 'value'
                     ELSE p.output ->> 'value' END)::float8
                   AS challenger_value,
               f.label AS truth
        FROM predictions p
        JOIN shadow_predictions s
            ON s.request_id = p.request_id AND s.row_index = p.row_index AND s.model_name = p.model_name
        LEFT JOIN feedback f ON f.request_id = p.request_id AND f.row_index = p.row_index
        WHERE p.model_name = %(model)s AND p.created_at >= %(since)s
          AND ((p.model_version = %(champion)s AND s.model_version = %(challenger)s)
            OR (p.model_version = %(challenger)s AND s.model_version = %(champion)s))
    )
    SELECT count(*),
           count(DISTINCT request_id),
           count(*) FILTER (WHERE CASE
               WHEN champion_label IS NOT NULL THEN champion_label = challenger_label
               ELSE abs(champion_value - challenger_value) <= %(tolerance)s * greatest(abs(champion_value), 1e-12)
           END),
           count(*) FILTER (WHERE truth IS NOT NULL AND champion_label IS NOT NULL),
           count(*) FILTER (WHERE truth IS NOT NULL AND champion_label = truth),
           count(*) FILTER (WHERE truth IS NOT NULL AND champion_label IS NOT NULL AND challenger_label = truth),
           count(*) FILTER (WHERE challenger_served),
           count(*) FILTER (WHERE champion_label IS NULL)
    FROM pairs
"""


# Recording batches ----------------------------------------------------------------------------

_COLUMNS = ", ".join(PREDICTION_COPY_COLUMNS)
_COPY_PREDICTIONS = f"COPY predictions ({_COLUMNS}) FROM STDIN"
# For a flush that meets a request id already recorded: the same lines into a table of this
# connection's (temporary, emptied at each commit), then only the rows not there yet.
_STAGING_TABLE = (
    "CREATE TEMP TABLE IF NOT EXISTS prediction_rows (LIKE predictions INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
)
_COPY_STAGED = f"COPY pg_temp.prediction_rows ({_COLUMNS}) FROM STDIN"
_INSERT_STAGED = f"""
    INSERT INTO predictions ({_COLUMNS})
    SELECT {_COLUMNS} FROM pg_temp.prediction_rows
    ON CONFLICT DO NOTHING
"""
# The columns served and mirrored rows share, with their short keys and types in the documents
# `jsonb_to_recordset` unpacks (`_record` writes them).
_RECORD_COLUMNS = {
    "request_id": ("r", "text"),
    "row_index": ("i", "int"),
    "model_name": ("n", "text"),
    "model_version": ("v", "text"),
    "label": ("l", "text"),
    "probability": ("p", "float8"),
    "output": ("o", "jsonb"),
}


def _insert_records(table: str, column: str, key: str, sql_type: str) -> str:
    """The INSERT of a `_document` of rows into `table`: the shared columns and the row's own
    (`column`, under `key`, of `sql_type`); a row already there keeps its first values."""
    columns = {**_RECORD_COLUMNS, column: (key, sql_type)}
    keys = ", ".join(short for short, _ in columns.values())
    types = ", ".join(f"{short} {of}" for short, of in columns.values())
    return f"""
    INSERT INTO {table} ({", ".join(columns)})
    SELECT {keys} FROM jsonb_to_recordset(%s::jsonb) AS t({types})
    ON CONFLICT DO NOTHING
    """


# `PredictionRow`s, one at a time: their `prediction_rows_document`.
INSERT_PREDICTION_ROWS = _insert_records("predictions", "features", "f", "jsonb")
_INSERT_SHADOW_ROWS = _insert_records("shadow_predictions", "rollout_id", "x", "bigint")


def _record(row: PredictionRow | ShadowRow, key: str, value: Any) -> dict[str, Any]:
    """A row's object in a `_document`: the fields of `_RECORD_COLUMNS` under their short keys, and
    one of the row's own (`key`: `value`). A dict literal: building the object per row is the cost
    that matters here."""
    return {
        "r": row.request_id,
        "i": row.row_index,
        "n": row.model_name,
        "v": row.model_version,
        "l": row.label,
        "p": row.probability,
        "o": row.output,
        key: value,
    }


def _document(records: list[dict[str, Any]]) -> str:
    """Rows one by one as one JSON document for `jsonb_to_recordset`, encoded in C by orjson:
    psycopg's array parameters are quoted element by element in Python, which cost the serving
    loop more than the prediction itself (py-spy, benchmarks/README.md)."""
    return orjson.dumps(records, default=str).decode()


def prediction_rows_document(rows: Sequence[PredictionRow]) -> str:
    """The document `INSERT_PREDICTION_ROWS` unpacks."""
    return _document([_record(row, "f", row.features) for row in rows])


async def _write_lines(copy: psycopg.AsyncCopy, batches: Sequence[PredictionBatch]) -> None:
    """A request's lines at a time, letting the event loop serve the requests that wait in between:
    the lines are built here, in the serving process."""
    for batch in batches:
        await copy.write(batch.lines(batch.skip))
        await asyncio.sleep(0)
