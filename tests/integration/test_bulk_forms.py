"""The request forms through the real stack (Nginx with TLS, the Serve replica, PostgreSQL):
`instances`, `columns`, an Arrow IPC stream and a Parquet file give the same answers and the same
422s, and every answered row is recorded once by the COPY path, with the features sent and the
answer given; and the store's COPY of whole requests on its own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import psycopg
import pyarrow as pa
import pytest

from benchmarks.peers import sample_rows
from cluster.sandbox import temporary_database
from core.health import wait_until
from services.feedback.store import FeedbackStore, PredictionBatch, PredictionRow
from tests.stack_probes import champion_client
from tests.table_bodies import arrow_stream, parquet_file

ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
ROWS = 50  # MAX_BATCH_ROWS of the test stack


@pytest.fixture(scope="module")
def api(stack, trained) -> Iterator[httpx.Client]:
    with champion_client(stack) as client:
        yield client


@pytest.fixture(scope="module")
def rows() -> list[dict[str, Any]]:
    return sample_rows(ROWS, seed=21)


def _table(rows: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def _bodies(rows: list[dict[str, Any]]) -> dict[str, tuple[str, bytes]]:
    names = list(rows[0])
    table = _table(rows)
    return {
        "instances": ("application/json", orjson.dumps({"instances": rows})),
        "columns": ("application/json", orjson.dumps({"columns": {n: [r.get(n) for r in rows] for n in names}})),
        "arrow": (ARROW, arrow_stream(table)),
        "parquet": (PARQUET, parquet_file(table)),
    }


def _post(api: httpx.Client, content_type: str, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    return api.post("/v1/predict", content=body, headers={"Content-Type": content_type, **(headers or {})})


def _recorded(stack, request_ids: list[str]) -> list[tuple[Any, ...]]:
    dsn = stack.settings.database.url.get_secret_value()
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT request_id, row_index, model_version, label, probability, features, output FROM predictions "
            "WHERE request_id = ANY(%s) ORDER BY request_id, row_index",
            (request_ids,),
        ).fetchall()


def test_every_form_answers_alike_and_every_row_is_recorded_once(api, stack, rows):
    answers = {form: _post(api, *body) for form, body in _bodies(rows).items()}
    for form, response in answers.items():
        assert response.status_code == 200, (form, response.text[:500])
    reference = answers["instances"].json()["predictions"]
    assert len(reference) == ROWS
    for form, response in answers.items():
        assert response.json()["predictions"] == reference, form
    ids = {form: response.json()["request_id"] for form, response in answers.items()}
    expected = len(ids) * ROWS
    assert wait_until(lambda: len(_recorded(stack, list(ids.values()))) == expected, 30), "rows not recorded"
    recorded = _recorded(stack, list(ids.values()))
    assert len({(r[0], r[1]) for r in recorded}) == expected  # once each
    by_request: dict[str, list[tuple[Any, ...]]] = {}
    for row in recorded:
        by_request.setdefault(row[0], []).append(row)
    for form, rid in ids.items():
        stored = by_request[rid]
        assert [r[1] for r in stored] == list(range(ROWS)), form
        assert [r[3] for r in stored] == [p["label"] for p in reference], form
        assert [r[4] for r in stored] == [p["probability"] for p in reference], form
        assert [r[5] for r in stored] == rows, form  # the features as sent
        assert [r[6] for r in stored] == [{"probabilities": p["probabilities"]} for p in reference], form


def test_a_bad_row_gets_the_same_422_in_every_form(api, rows):
    bad = [dict(row) for row in rows[:10]]
    bad[6]["workclass"] = "Astronaut"
    answers = {form: _post(api, *body) for form, body in _bodies(bad).items()}
    reference = answers["instances"].json()["error"]
    assert [d["loc"] for d in reference["details"]] == [["body", "instances", 6, "workclass"]]
    for form, response in answers.items():
        assert response.status_code == 422, form
        assert response.json()["error"]["details"] == reference["details"], form
        assert response.json()["error"]["message"] == reference["message"], form
        assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


def test_too_many_rows_in_a_table_is_a_422(api):
    rows = sample_rows(ROWS + 1, seed=22)
    for form in ("arrow", "parquet"):
        response = _post(api, *_bodies(rows)[form])
        assert response.status_code == 422, form
        assert response.json()["error"]["details"][0]["msg"] == f"at most {ROWS} rows per request, got {ROWS + 1}"


def test_feedback_finds_a_row_of_a_parquet_request(api, rows):
    predicted = _post(api, *_bodies(rows[:5])["parquet"]).json()
    label = predicted["predictions"][3]["label"]
    response = api.post("/v1/feedback", json={"request_id": predicted["request_id"], "index": 3, "label": label})
    assert response.status_code == 201, response.text
    assert response.json()["correct"] is True


def test_a_reused_request_id_keeps_its_first_prediction(api, stack, rows):
    rid = f"bulk-{uuid.uuid4().hex}"
    first = _post(api, *_bodies(rows[:3])["columns"], {"X-Request-ID": rid})
    again = _post(api, *_bodies(rows[10:14])["arrow"], {"X-Request-ID": rid})
    assert first.status_code == again.status_code == 200
    assert wait_until(lambda: len(_recorded(stack, [rid])) == 4, 30)
    recorded = _recorded(stack, [rid])
    # Rows 0-2 as the first request sent them; row 3 only the second request had.
    assert [r[5] for r in recorded] == [*rows[:3], rows[13]]


# The store's COPY of whole requests, on a database of its own ----------------------------------


def _batch(request_id: str, rows: list[dict[str, Any]], labels: list[str], skip: int = 0) -> PredictionBatch:
    """A request's batch as the replica records it (RecordLines), for a two-class model on `rows`."""
    import numpy as np
    import pandas as pd

    from jobs.config import DataConfig, JobConfig
    from serve_apps.champion import AnswerNumbers, LoadedModel, RecordLines
    from serve_apps.validation import RowValidator
    from tests.predictors import untrained_predictor

    frame = pd.DataFrame({"x": [0, 1, 2, 3], "c": ["v0", "v1", "v2", "v3"], "y": ["a", "b", "a", "b"]})
    predictor = untrained_predictor(frame, JobConfig(name="m", data=DataConfig(train_uri="memory", target="y")))
    model = LoadedModel("m", "1", "", predictor, RowValidator(predictor.schema), 0.0)
    batch = model.validator.from_rows(rows)
    assert batch is not None
    outputs = np.array([[0.9, 0.1] if label == "a" else [0.2, 0.8] for label in labels])
    return PredictionBatch(
        request_id,
        "m",
        "1",
        len(rows),
        RecordLines(request_id, model, AnswerNumbers.of(outputs, "classification"), batch),
        skip,
    )


def _bad_lines(skip: int) -> bytes:
    return b"r5\t0\tm\t1\ta\t0.5\t{not json\t{}\n"


def test_the_store_copies_whole_requests_once_and_keeps_the_first():
    rows = [{"x": i, "c": f"v{i % 4}"} for i in range(5)]

    async def scenario(dsn: str) -> list[tuple[Any, ...]]:
        store = FeedbackStore(dsn)
        await store.open()
        try:
            await store.migrate()
            batch = _batch("r1", rows, ["a", "b", "a", "b", "a"])
            single = PredictionRow("r2", 0, "m", "1", "b", 0.7, {"x": 9}, {"probabilities": {"a": 0.3, "b": 0.7}})
            await store.record_predictions([batch, single])
            # The same flush again (its commit went unacknowledged, say): nothing doubles, and a
            # request id reused with other rows keeps what was recorded first.
            await store.record_predictions([batch, _batch("r1", rows, ["b"] * 5), single])
            # A batch the buffer cut: its first rows are left out, the others keep their index.
            await store.record_predictions([_batch("r3", rows, ["a"] * 5, skip=3)])
            # A conflict again: the connection's staging table is there already.
            await store.record_predictions([_batch("r4", rows[:1], ["b"])])
            await store.record_predictions([_batch("r4", rows[:1], ["a"]), _batch("r3", rows, ["b"] * 5)])
            with pytest.raises(psycopg.DataError):
                await store.record_predictions([PredictionBatch("r5", "m", "1", 1, _bad_lines)])
            async with store._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT request_id, row_index, label, probability, features, output FROM predictions "
                    "ORDER BY request_id, row_index"
                )
                return await cur.fetchall()
        finally:
            await store.close()

    with temporary_database("bulk_copy") as name:
        stored = asyncio.run(scenario(f"postgresql://postgres@127.0.0.1:5432/{name}"))
    assert [(r[0], r[1]) for r in stored] == [
        *[("r1", i) for i in range(5)],
        ("r2", 0),
        *[("r3", i) for i in range(5)],
        ("r4", 0),
    ]
    assert [r[2] for r in stored[:5]] == ["a", "b", "a", "b", "a"]
    assert stored[0][3:] == (0.9, rows[0], {"probabilities": {"a": 0.9, "b": 0.1}})
    assert stored[5][2:] == ("b", 0.7, {"x": 9}, {"probabilities": {"a": 0.3, "b": 0.7}})
    # r3's rows 3-4 from its first flush, rows 0-2 from the later one; r4 as first recorded.
    assert [r[2] for r in stored[6:11]] == ["b", "b", "b", "a", "a"] and stored[9][4] == rows[3]
    assert stored[11][2] == "b"
