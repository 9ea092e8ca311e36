"""The bulk request path without Ray or a database: every request form (`instances`, `columns`,
an Arrow IPC stream, a Parquet file) validated alike, the columns encoded as the rows are, the
answer encoded without a dict per row, malformed bodies answered as FastAPI's body parameter
answered them, and prediction records buffered and written whole."""

from __future__ import annotations

import asyncio
import json
import math
import struct
from typing import Any

import numpy as np
import orjson
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient

from core.keys import KeyStore, bootstrap_principals, hash_api_key
from core.settings import Settings
from jobs.config import DataConfig, FeatureDecl, JobConfig
from jobs.predictor import TabularPredictor
from serve_apps.api import create_api
from serve_apps.champion import (
    AnswerNumbers,
    ChampionModel,
    LoadedModel,
    PredictionsJson,
    RecordLines,
    to_predictions,
)
from serve_apps.errors import install_error_handlers
from serve_apps.fleet import ModelFleet, Routed, predict_by_model
from serve_apps.metrics import IngressMetrics
from serve_apps.replica import Replica
from serve_apps.schemas import PredictRequest
from serve_apps.validation import RowValidator, compressed_message
from services.feedback.recorder import PredictionRecorder, RowBuffer
from services.feedback.store import PREDICTION_COPY_COLUMNS, PredictionBatch, PredictionRow, copy_text
from tests.predictors import untrained_predictor
from tests.table_bodies import arrow_stream, parquet_file

pytestmark = pytest.mark.unit

KEY = "bulk-forms-key"
AUTH = {"X-API-Key": KEY}
ARROW = "application/vnd.apache.arrow.stream"
PARQUET = "application/vnd.apache.parquet"
COLORS = ["blue", "green", "red"]
COUNTRIES = ["FR", "US"]


def _frame(rows: int = 300) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 90, rows),
            "fnlwgt": rng.uniform(1e4, 1e6, rows),
            "hours": np.where(rng.random(rows) < 0.1, np.nan, rng.integers(1, 99, rows).astype(float)),
            "color": rng.choice(COLORS, rows),
            "country": [None if rng.random() < 0.1 else str(rng.choice(COUNTRIES)) for _ in range(rows)],
        }
    )
    frame["y"] = np.where(frame["age"] > 50, "old", np.where(frame["age"] > 30, "mid", "young"))
    return frame


def _predictor(task: str = "classification", seed: int = 0) -> TabularPredictor:
    frame = _frame()
    if task == "regression":
        frame["y"] = frame["age"] * 2.5
    features = {"age": FeatureDecl(kind="numeric", buckets=8), "fnlwgt": FeatureDecl(kind="numeric", transform="log1p")}
    config = JobConfig(name="bulk", task=task, data=DataConfig(train_uri="memory", target="y", features=features))
    torch.manual_seed(seed)
    return untrained_predictor(frame, config)


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    predictor = _predictor()
    return LoadedModel("bulk", "1", "run-1", predictor, RowValidator(predictor.schema), 0.0)


def _rows(n: int = 40, seed: int = 1) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        rows.append(
            {
                "age": int(rng.integers(18, 90)),
                "fnlwgt": float(rng.uniform(1e4, 1e6)) if i % 3 else int(rng.integers(10_000, 900_000)),
                "hours": None if i % 7 == 0 else float(rng.integers(1, 99)),
                "color": COLORS[i % 3],
                "country": None if i % 5 == 0 else COUNTRIES[i % 2],
            }
        )
    return rows


# Encoding: the columns as the rows, the answer as the dicts --------------------------------------


def test_the_columns_give_the_model_the_inputs_and_outputs_the_rows_give(model):
    rows = _rows(200)
    batch = model.validator.from_rows(rows)
    assert batch is not None
    by_rows = model.predictor.preprocessor.encode_records(rows)
    by_columns = model.encoder.encode(batch)
    assert np.array_equal(by_rows.x_cat, by_columns.x_cat)
    assert np.array_equal(by_rows.x_num, by_columns.x_num)
    assert np.array_equal(model.outputs(batch), model.predictor.record_outputs(rows))


def test_a_calibrated_classifier_and_a_regressor_match_too():
    rows = _rows(50)
    calibrated = _predictor()
    calibrated.temperature = 1.7
    regressor = _predictor("regression")
    for predictor in (calibrated, regressor):
        loaded = LoadedModel("m", "1", "", predictor, RowValidator(predictor.schema), 0.0)
        batch = loaded.validator.from_rows(rows)
        assert batch is not None
        assert np.array_equal(loaded.outputs(batch), predictor.record_outputs(rows))


@pytest.mark.parametrize(
    ("task", "classes", "outputs"),
    [
        ("classification", ["<=50K", ">50K"], np.random.default_rng(0).dirichlet([1, 1], 500).astype(np.float32)),
        ("classification", ["a", 'b "quoted"', "ç"], np.random.default_rng(1).dirichlet([1, 1, 1], 300)),
        ("classification", ["no", "yes"], np.array([[1.0, 0.0], [0.0, 1.0], [1e-7, 1 - 1e-7], [0.5, 0.5]])),
        ("regression", None, np.array([1.5, -2.0, 0.0, 1e-9, 3.3e12, 123456789.123])),
        ("regression", None, np.random.default_rng(2).normal(size=400) * 1e4),
    ],
)
def test_the_answer_is_the_json_of_the_prediction_dicts_byte_for_byte(task, classes, outputs):
    expected = orjson.dumps(to_predictions(outputs, task, classes))
    assert PredictionsJson(task, classes).encode(outputs) == expected
    assert PredictionsJson(task, classes).encode(outputs[:1]) == orjson.dumps(
        to_predictions(outputs[:1], task, classes)
    )
    assert PredictionsJson(task, classes).encode(outputs[:0]) == b"[]"


def test_a_joined_batch_answers_each_request_as_alone(model):
    champion = ChampionModel("bulk", "champion", "http://127.0.0.1:9", 60)
    champion.loaded = model
    first, second = _rows(3, seed=2), _rows(5, seed=3)
    batches = [model.validator.from_rows(first), model.validator.from_rows(second)]
    results = predict_by_model([Routed(champion, model, b) for b in batches])
    assert [len(r.outputs) for r in results] == [3, 5]
    # The same as alone, up to the float rounding of another batch size.
    assert np.allclose(results[1].outputs, champion.predict([second])[0].outputs, atol=1e-6)
    assert np.allclose(results[0].outputs, champion.predict([first])[0].outputs, atol=1e-6)
    assert orjson.loads(results[0].predictions_json()) == results[0].predictions


def test_a_version_with_other_categories_recodes_through_the_rows(model):
    """A canary's challenger may know more categories: the champion's codes are not its codes."""
    frame = _frame()
    frame.loc[0, "color"] = "amber"  # sorts first: every code of the challenger's colors moves
    config = JobConfig(name="bulk", data=DataConfig(train_uri="memory", target="y"))
    wider = untrained_predictor(frame, config)
    challenger = LoadedModel("bulk", "2", "", wider, RowValidator(wider.schema), 0.0)
    rows = _rows(30)
    batch = model.validator.from_rows(rows)
    champion = ChampionModel("bulk", "champion", "http://127.0.0.1:9", 60)
    (result,) = champion.predict([batch], challenger)
    assert np.array_equal(result.outputs, wider.record_outputs(rows))


# The forms: one batch, one set of errors ------------------------------------------------------------


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names = list(dict.fromkeys(name for row in rows for name in row))
    return {name: [row.get(name) for row in rows] for name in names}


class FakeStore:
    def __init__(self) -> None:
        self.predictions: list[PredictionRow | PredictionBatch] = []

    async def record_predictions(self, rows: list[Any]) -> None:
        self.predictions.extend(rows)

    async def record_shadow_predictions(self, rows: list[Any]) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def client(model, store) -> TestClient:
    champion = ChampionModel("bulk", "champion", "http://127.0.0.1:9", 60)
    champion.loaded = model

    async def predict_batch(item: Routed) -> Any:
        return predict_by_model([item])[0]

    replica = Replica(
        settings=Settings(_env_file=None, database={"url": "postgresql://nobody@127.0.0.1:1/none"}),
        fleet=ModelFleet(champion, lambda name: champion, 4),
        metrics=IngressMetrics(),
        predict_batch=predict_batch,
        max_rows=100,
    )
    replica._recorder = PredictionRecorder(store, 60.0, 10_000)
    app = create_api()
    app.state.key_store = KeyStore(bootstrap_principals([hash_api_key(KEY)]))
    app.state.alert_token_store = None
    app.state.replica = replica
    return TestClient(app)


def _send(client: TestClient, content: bytes, content_type: str | None) -> Any:
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    return client.post("/v1/predict", content=content, headers=headers)


def _every_form(client: TestClient, rows: list[dict[str, Any]], arrow: pa.Table | None = None) -> dict[str, Any]:
    """The same rows as instances, columns, an Arrow stream and a Parquet file (the table given,
    or the one pyarrow infers from the rows)."""
    table = arrow if arrow is not None else pa.Table.from_pylist(rows)
    # The standard library writes NaN and Infinity, as a client may send them.
    return {
        "instances": _send(client, json.dumps({"instances": rows}).encode(), "application/json"),
        "columns": _send(client, json.dumps({"columns": _columns(rows)}).encode(), "application/json"),
        "arrow": _send(client, arrow_stream(table), ARROW),
        "parquet": _send(client, parquet_file(table), PARQUET),
    }


def test_every_form_gives_the_same_answer_and_records_it(client, store):
    rows = _rows(60)
    answers = _every_form(client, rows)
    bodies = {form: response.json() for form, response in answers.items()}
    assert all(r.status_code == 200 for r in answers.values()), {f: r.text[:300] for f, r in answers.items()}
    reference = bodies["instances"]["predictions"]
    assert len(reference) == 60
    assert all(body["predictions"] == reference for body in bodies.values())
    # A dictionary-encoded category column is the same column.
    table = pa.Table.from_pylist(rows)
    encoded = table.set_column(3, "color", table.column("color").dictionary_encode())
    assert _send(client, arrow_stream(encoded), ARROW).json()["predictions"] == reference
    assert _send(client, parquet_file(encoded), "application/x-parquet").json()["predictions"] == reference
    # Each request is recorded whole: its rows' features as sent, and the answer.
    asyncio.run(client.app.state.replica._recorder.flush())
    recorded = [b for b in store.predictions if isinstance(b, PredictionBatch)]
    assert len(recorded) == 6 and all(len(b) == 60 for b in recorded)
    for batch in recorded:
        lines = copy_rows(batch.lines(0))
        assert [line["row_index"] for line in lines] == [str(i) for i in range(60)]
        assert {line["request_id"] for line in lines} == {batch.request_id}
        assert [json.loads(line["features"]) for line in lines] == rows
        assert [line["label"] for line in lines] == [p["label"] for p in reference]
        assert [float(line["probability"]) for line in lines] == [p["probability"] for p in reference]
        assert [json.loads(line["output"]) for line in lines] == [
            {"probabilities": p["probabilities"]} for p in reference
        ]


# A bad number, in each form it can be sent in: the errors are the same, naming row and field. A
# wrong type fills a whole Arrow column (a column has one type); a wrong value can be in some rows.
BAD: dict[str, tuple[Any, int, tuple[str, ...]]] = {
    "numbers as strings": ("30", 0, ("instances", "columns", "arrow", "parquet")),
    "true for a number": (True, 0, ("instances", "columns", "arrow", "parquet")),
    "a list": ([1], 0, ("instances", "columns", "arrow", "parquet")),
    "a longer list": ([1, 2], 0, ("instances", "columns", "arrow")),
    "NaN": (math.nan, 3, ("instances", "columns", "arrow", "parquet")),
    "infinity": (math.inf, 3, ("instances", "columns", "arrow", "parquet")),
    "null where not allowed": (None, 3, ("instances", "columns", "arrow", "parquet")),
    "an integer beyond float64": (10**400, 3, ("instances", "columns")),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_number_gets_the_same_422_in_every_form(client, case):
    value, first, forms = BAD[case]
    rows = _rows(10)
    for row in rows[first:]:
        row["age"] = value
    table = pa.Table.from_pylist(rows) if "arrow" in forms else pa.table({"x": [1]})
    answers = {form: response for form, response in _every_form(client, rows, table).items() if form in forms}
    errors = {form: answers[form].json() for form in forms}
    assert all(answers[form].status_code == 422 for form in forms), errors
    reference = errors["instances"]["error"]
    assert reference["details"][0]["loc"] == ["body", "instances", first, "age"]
    for form in forms:
        assert errors[form]["error"]["details"] == reference["details"], form
        assert errors[form]["error"]["message"] == reference["message"], form


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("unknown category", lambda row: row.update(color="purple")),
        ("a number for a category", lambda row: row.update(color=7)),
        ("null for a category that has none", lambda row: row.update(color=None)),
        ("a missing feature", lambda row: row.pop("fnlwgt")),
        ("an unknown feature", lambda row: row.update(colour="red")),
    ],
)
def test_a_bad_category_or_field_gets_the_same_422_in_every_form(client, case, change):
    rows = _rows(8)
    for row in rows:
        change(row)
    answers = _every_form(client, rows)
    reference = answers["instances"].json()["error"]
    assert answers["instances"].status_code == 422
    for form, response in answers.items():
        assert response.status_code == 422, (form, response.text)
        assert response.json()["error"]["details"] == reference["details"], form


def test_one_bad_row_among_good_ones_is_named_in_every_form(client):
    rows = _rows(50)
    rows[37]["color"] = "mauve"
    answers = _every_form(client, rows)
    for form, response in answers.items():
        details = response.json()["error"]["details"]
        assert [d["loc"] for d in details] == [["body", "instances", 37, "color"]], form
        assert details[0]["type"] == "unknown_category" and "'mauve'" in details[0]["msg"]


def test_a_long_value_in_a_dictionary_column_is_cut_before_it_becomes_python(client):
    """A dictionary-encoded column could repeat one huge value on every row; the error shows its
    first 64 characters whatever form it came in."""
    rows = _rows(100)
    huge = "z" * 200_000
    table = pa.Table.from_pylist(rows)
    colors = pa.DictionaryArray.from_arrays(pa.array([0] * 100, pa.int32()), pa.array([huge]))
    table = table.set_column(3, "color", colors)
    response = _send(client, arrow_stream(table), ARROW)
    assert response.status_code == 422
    details = response.json()["error"]["details"]
    assert len(details) == 20 and details[0]["type"] == "unknown_category"
    assert f"unknown category {'z' * 64!r}" in details[0]["msg"] and len(response.content) < 20_000


def test_a_valid_null_in_a_dictionary_is_a_null():
    predictor = _predictor()
    validator = RowValidator(predictor.schema)
    rows = _rows(10)
    table = pa.Table.from_pylist(rows)
    countries = pa.DictionaryArray.from_arrays(pa.array([0, 1] * 5, pa.int32()), pa.array(["FR", None]))
    table = table.set_column(4, "country", countries)
    # The columns path says no (a dictionary's null); the rows path finds it valid, as the route does.
    assert validator.from_table(table) is None
    assert validator.errors(table.to_pylist()) == []


def test_too_many_rows_is_a_422_in_every_form_and_parquet_is_not_decoded(client):
    rows = _rows(101)
    answers = _every_form(client, rows)
    assert answers["instances"].json()["error"]["details"][0]["msg"] == "at most 100 instances per request, got 101"
    for form in ("columns", "arrow", "parquet"):
        detail = answers[form].json()["error"]["details"][0]
        assert answers[form].status_code == 422 and detail["type"] == "too_long", form
        assert detail["msg"] == "at most 100 rows per request, got 101"
    assert answers["columns"].json()["error"]["details"][0]["loc"] == ["body", "columns"]
    assert answers["parquet"].json()["error"]["details"][0]["loc"] == ["body"]


# Bodies that are not what they say ---------------------------------------------------------------


def test_a_compressed_arrow_stream_is_refused_before_it_is_decoded(client):
    table = pa.Table.from_pylist(_rows(5))
    body = arrow_stream(table, "zstd")
    messages = list(ipc.MessageReader.open_stream(pa.py_buffer(body)))
    assert [compressed_message(m.metadata.to_pybytes()) for m in messages] == [False, True]
    response = _send(client, body, ARROW)
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == ["body"] and detail["type"] == "arrow_invalid" and "uncompressed" in detail["msg"]


def test_a_parquet_file_that_could_expand_is_refused_before_it_is_decoded(client):
    rows = _rows(5)
    response = _send(client, parquet_file(pa.Table.from_pylist(rows), compression="zstd"), PARQUET)
    assert response.status_code == 422
    assert (
        "with ZSTD: send the Parquet file uncompressed or with Snappy" in response.json()["error"]["details"][0]["msg"]
    )
    lists = pa.Table.from_pylist([{**row, "age": [1, 2, 3]} for row in rows])
    response = _send(client, parquet_file(lists), PARQUET)
    assert response.json()["error"]["details"][0]["type"] == "parquet_invalid"
    assert "holds more values than rows" in response.json()["error"]["details"][0]["msg"]
    assert _send(client, parquet_file(pa.Table.from_pylist(rows), compression="none"), PARQUET).status_code == 200


@pytest.mark.parametrize(
    ("body", "content_type", "kind"),
    [
        (b"not arrow at all", ARROW, "arrow_invalid"),
        (b"", ARROW, "missing"),
        (b"PAR1 not parquet PAR1", PARQUET, "parquet_invalid"),
        (b'{"instances": []}', PARQUET, "parquet_invalid"),
    ],
)
def test_a_body_that_is_not_its_content_type_is_a_422_naming_the_body(client, body, content_type, kind):
    response = _send(client, body, content_type)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"][0]["loc"] == ["body"]
    assert response.json()["error"]["details"][0]["type"] == kind
    # The hint is about the table the caller chose, not a switch to JSON.
    message = response.json()["error"]["message"]
    assert "Arrow IPC stream or a Parquet file" in message and "application/json" not in message, message


def test_a_crafted_offset_in_an_arrow_stream_is_a_422():
    """The IPC reader checks the layout only: the full validation catches a string offset that
    points past its data before a compute kernel reads it."""
    from serve_apps.validation import UnreadableBodyError, read_arrow_stream

    good = arrow_stream(pa.table({"s": pa.array(["ab", "cd"])}))
    # The offsets buffer [0, 2, 4] as int32: point the last one far past the data.
    crafted = good.replace(struct.pack("<iii", 0, 2, 4), struct.pack("<iii", 0, 2, 4000), 1)
    assert crafted != good
    with pytest.raises(UnreadableBodyError):
        read_arrow_stream(crafted, 100)


def _reference_app() -> FastAPI:
    """The predict route as it was: FastAPI's own body parameter reads and validates the body."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/predict")
    async def predict(body: PredictRequest) -> dict[str, str]:
        return {"status": "read"}

    return app


ROW_JSON = json.dumps(_rows(1)[0])


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(json.dumps({"instances": [{"a": 1}]}), "text/plain", id="text-plain"),
        pytest.param("instances=1", "application/x-www-form-urlencoded", id="form"),
        pytest.param(
            b'--b\r\nContent-Disposition: form-data; name="instances"\r\n\r\n1\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            id="multipart",
        ),
        pytest.param(json.dumps({"instances": [{"a": 1}]}), None, id="no-content-type"),
        pytest.param(b"", "application/json", id="empty"),
        pytest.param(b'{"instances": [', "application/json", id="truncated"),
        pytest.param(b"\xff\xfe", "application/json", id="utf16-bom-only"),
        pytest.param(b'{"instances": ["\xff\xfe\xfd"]}', "application/json", id="invalid-utf8"),
        pytest.param("[" * 5000 + "]" * 5000, "application/json", id="nested"),
        pytest.param(f"[{ROW_JSON}]", "application/json", id="an-array"),
        pytest.param('{"instances": []}', "application/json", id="empty-instances"),
        pytest.param(f'{{"instances": [{ROW_JSON}], "instances": []}}', "application/json", id="duplicate-key"),
        pytest.param(f'{{"rows": [{ROW_JSON}]}}', "application/json", id="no-instances"),
        pytest.param(f'{{"instances": [{ROW_JSON}], "extra": 1}}', "application/json", id="extra-key"),
        pytest.param('{"instances": "x"}', "application/json", id="not-a-list"),
        pytest.param(f'{{"instances": [{ROW_JSON}, 1, "x"]}}', "application/json", id="not-objects"),
        pytest.param('{"instances": null}', "application/vnd.api+json", id="json-subtype"),
        pytest.param(f'{{"instances": [{ROW_JSON}], "columns": {{}}}}', "application/json", id="both-forms"),
    ],
)
def test_a_malformed_body_gets_the_answer_fastapi_gave(client, content, content_type):
    reference = TestClient(_reference_app())
    headers = {"Content-Type": content_type} if content_type else {}
    expected = reference.post("/v1/predict", content=content, headers=headers)
    response = _send(client, content.encode() if isinstance(content, str) else content, content_type)
    assert expected.status_code == 422 and response.status_code == 422, response.text
    assert response.json()["error"]["details"] == expected.json()["error"]["details"]
    assert response.json()["error"]["message"] == expected.json()["error"]["message"]


@pytest.mark.parametrize(
    ("columns", "loc", "kind"),
    [
        ({}, ["body", "columns"], "too_short"),
        ({"age": "x"}, ["body", "columns", "age"], "list_type"),
        ({"age": [1, 2], "color": ["red"]}, ["body", "columns", "color"], "length_mismatch"),
        ({"age": [], "color": []}, ["body", "columns"], "too_short"),
    ],
)
def test_columns_that_are_no_table_name_the_column(client, columns, loc, kind):
    response = _send(client, orjson.dumps({"columns": columns}), "application/json")
    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert detail["loc"] == loc and detail["type"] == kind


def test_values_orjson_refuses_are_read_as_the_standard_library_reads_them(client):
    """NaN and integers beyond 64 bits fail orjson: the standard library's reading decides, so the
    error is the row's, as before."""
    row = _rows(1)[0]
    body = json.dumps({"instances": [row]}).replace(f'"age": {row["age"]}', '"age": NaN').encode()
    response = _send(client, body, "application/json")
    assert response.json()["error"]["details"] == [
        {
            "loc": ["body", "instances", 0, "age"],
            "msg": "must be a finite number (within ±1.8e308)",
            "type": "value_error",
        }
    ]
    bom = b"\xef\xbb\xbf" + json.dumps({"instances": [row]}).encode()
    assert _send(client, bom, "application/json").status_code == 200


def test_the_openapi_document_declares_every_form():
    spec = create_api().openapi()
    for path in ("/v1/predict", "/v1/models/{name}/predict"):
        body = spec["paths"][path]["post"]["requestBody"]
        assert set(body["content"]) == {"application/json", ARROW, PARQUET, "application/x-parquet"}
        refs = {s["$ref"].rsplit("/", 1)[-1] for s in body["content"]["application/json"]["schema"]["anyOf"]}
        assert refs == {"PredictRequest", "ColumnsRequest"}
    assert spec["components"]["schemas"]["PredictRequest"]["examples"][0]["instances"][0]["workclass"] == "State-gov"
    assert spec["paths"]["/v1/predict"]["post"]["operationId"] == "predict_v1_predict_post"


# The record ------------------------------------------------------------------------------------


def _outputs_of(predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"probabilities": p["probabilities"]} for p in predictions]


_COPY_ESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def copy_rows(data: bytes) -> list[dict[str, Any]]:
    """COPY text lines back into fields: tab-separated, \\N for null, backslash escapes."""
    import re

    def field(raw: str) -> str | None:
        if raw == "\\N":
            return None
        return re.sub(r"\\(.)", lambda m: _COPY_ESCAPES[m.group(1)], raw)

    assert data.endswith(b"\n")
    return [
        dict(zip(PREDICTION_COPY_COLUMNS, map(field, line.split("\t")), strict=True))
        for line in data.decode().split("\n")[:-1]
    ]


def test_the_record_lines_hold_each_row_as_sent_and_as_answered(model):
    rows = _rows(30)
    outputs = model.predictor.record_outputs(rows)
    expected = to_predictions(outputs, "classification", model.predictor.schema.classes)
    numbers = AnswerNumbers.of(outputs, "classification")
    forms = {
        "instances": model.validator.from_rows(rows),
        "columns": model.validator.from_sequences(_columns(rows), 30),
        "table": model.validator.from_table(pa.Table.from_pylist(rows)),
    }
    for form, batch in forms.items():
        assert batch is not None, form
        lines = copy_rows(RecordLines("rid\\1\t", model, numbers, batch)(0))
        assert [json.loads(line["features"]) for line in lines] == rows, form
        assert {line["request_id"] for line in lines} == {"rid\\1\t"}
        assert [(line["model_name"], line["model_version"]) for line in lines] == [("bulk", "1")] * 30
        assert [line["label"] for line in lines] == [p["label"] for p in expected]
        assert [float(line["probability"]) for line in lines] == [p["probability"] for p in expected]
        assert [json.loads(line["output"]) for line in lines] == [
            {"probabilities": p["probabilities"]} for p in expected
        ]
    # A batch cut by the buffer's bound: the rows left keep their index.
    tail = copy_rows(RecordLines("r", model, numbers, forms["columns"])(27))
    assert [line["row_index"] for line in tail] == ["27", "28", "29"]
    assert [json.loads(line["features"]) for line in tail] == rows[27:]
    assert RecordLines("r", model, numbers, forms["columns"])(30) == b""


def test_odd_names_and_values_survive_the_copy_format():
    """Backslashes, tabs and quotes in a category, a class or a request id, and integers beyond 64
    bits (valid numbers), come back from the COPY fields as they went in."""
    frame = _frame()
    frame.loc[:9, "color"] = 'back\\slash\t"tab"'
    frame.loc[:19, "y"] = "class\\with\ttab"
    predictor = untrained_predictor(frame, JobConfig(name="odd", data=DataConfig(train_uri="memory", target="y")))
    loaded = LoadedModel("odd", "7", "", predictor, RowValidator(predictor.schema), 0.0)
    rows = _rows(4)
    rows[0]["color"] = 'back\\slash\t"tab"'
    rows[1]["age"] = 10**30
    batch = loaded.validator.from_rows(rows)
    assert batch is not None
    outputs = np.zeros((4, 4))
    outputs[:, 0] = 1.0  # the first class, the one with the odd name
    lines = copy_rows(RecordLines("id", loaded, AnswerNumbers.of(outputs, "classification"), batch)(0))
    assert [json.loads(line["features"]) for line in lines] == rows
    assert lines[0]["label"] == "class\\with\ttab" == predictor.schema.classes[0]  # type: ignore[index]
    assert json.loads(lines[0]["output"])["probabilities"]["class\\with\ttab"] == 1.0
    assert copy_text("a\\b\tc\nd\re") == b"a\\\\b\\tc\\nd\\re"


def test_a_regressor_records_its_value_and_no_label():
    predictor = _predictor("regression")
    loaded = LoadedModel("r", "1", "", predictor, RowValidator(predictor.schema), 0.0)
    rows = _rows(5)
    batch = loaded.validator.from_rows(rows)
    assert batch is not None
    outputs = predictor.record_outputs(rows)
    lines = copy_rows(RecordLines("id", loaded, AnswerNumbers.of(outputs, "regression"), batch)(0))
    assert [(line["label"], line["probability"]) for line in lines] == [(None, None)] * 5
    assert [json.loads(line["output"]) for line in lines] == [{"value": v} for v in outputs.astype(float).tolist()]


def _no_lines(skip: int) -> bytes:
    return b""


def test_the_buffer_drops_the_oldest_rows_and_keeps_the_indexes_of_the_rest():
    dropped: list[int] = []
    buffer: RowBuffer[PredictionRow | PredictionBatch] = RowBuffer(5, dropped.append)
    first = PredictionBatch("a", "m", "1", 4, _no_lines)
    buffer.extend([first, PredictionRow("b", 0, "m", "1", None, None, {})])
    assert buffer.rows == 5 and dropped == []
    buffer.extend([PredictionBatch("c", "m", "1", 3, _no_lines)])
    items = buffer.take()
    assert dropped == [3] and [len(i) if isinstance(i, PredictionBatch) else 1 for i in items] == [1, 1, 3]
    assert isinstance(items[0], PredictionBatch) and items[0].skip == 3 and items[0].request_id == "a"
    buffer.put_back(items)
    assert buffer.rows == 5 and len(buffer) == 3


class FailingStore(FakeStore):
    def __init__(self, refuse: str | None = None, away: bool = False) -> None:
        super().__init__()
        self.refuse, self.away = refuse, away

    async def record_predictions(self, rows: list[Any]) -> None:
        if self.away:
            raise psycopg.OperationalError("server away")
        if any(getattr(r, "request_id", None) == self.refuse for r in rows):
            raise psycopg.errors.InvalidTextRepresentation("invalid input syntax for type json")
        self.predictions.extend(rows)


def test_a_flush_that_fails_keeps_every_row_for_the_next_and_a_refused_request_is_dropped_alone():
    store = FailingStore(away=True)
    dropped: list[int] = []
    recorder = PredictionRecorder(store, 1.0, 1000, on_dropped=dropped.append)  # type: ignore[arg-type]
    batches = [PredictionBatch(f"r{i}", "m", "1", 10, _no_lines) for i in range(3)]
    recorder.record(batches)
    with pytest.raises(psycopg.OperationalError):
        asyncio.run(recorder.flush())
    assert recorder.pending == 30 and store.predictions == []
    store.away, store.refuse = False, "r1"
    asyncio.run(recorder.flush())
    assert [b.request_id for b in store.predictions] == ["r0", "r2"] and dropped == [10]
    assert recorder.pending == 0


def _exotic_columns(rows: int) -> dict[str, pa.Array]:
    """Columns of types no feature has, each of which a client could send for any feature."""
    return {
        "large_string": pa.array(["red"] * rows, pa.large_string()),
        "string_view": pa.array(["red"] * rows, pa.string_view()),
        "binary": pa.array([b"red"] * rows, pa.binary()),
        "bool": pa.array([True] * rows),
        "decimal": pa.array([__import__("decimal").Decimal("1.5")] * rows, pa.decimal128(5, 2)),
        "date": pa.array([0] * rows, pa.date32()),
        "timestamp_far": pa.array([2**62] * rows, pa.timestamp("ns")).cast(pa.timestamp("s"), safe=False),
        "timestamp_overflow": pa.array([10**17] * rows, pa.timestamp("s")),
        "duration": pa.array([5] * rows, pa.duration("s")),
        "float16": pa.array(np.full(rows, 1.5, dtype=np.float16)),
        "uint64_max": pa.array([2**64 - 1] * rows, pa.uint64()),
        "list": pa.array([[1]] * rows),
        "struct": pa.array([{"a": 1}] * rows),
        "null": pa.nulls(rows),
        "dict_int": pa.array([30] * rows).dictionary_encode(),
        "dict_large_string": pa.array(["red"] * rows, pa.large_string()).dictionary_encode(),
        "binary_view": pa.array([b"red"] * rows, pa.binary_view()),
        "dict_string_view": pa.array(["red"] * rows, pa.string_view()).dictionary_encode(),
        "union": pa.UnionArray.from_sparse(pa.array([0] * rows, pa.int8()), [pa.array([1] * rows)]),
        "run_end": pa.RunEndEncodedArray.from_arrays([rows], pa.array(["red"])),
    }


_TEXT_KINDS = {"large_string", "string_view", "dict_large_string", "dict_string_view"}
# What each feature takes of those columns: "red" is a color and no country; every number is an
# age; only a country may be null.
_VALID = {
    "age": {"float16", "uint64_max", "dict_int"},
    "color": _TEXT_KINDS,
    "country": {"null"},
}


@pytest.mark.parametrize("kind", list(_exotic_columns(1)))
@pytest.mark.parametrize("feature", ["age", "color", "country"])
def test_any_arrow_type_in_any_feature_is_answered_never_a_server_error(client, kind, feature):
    rows = _rows(6)
    table = pa.Table.from_pylist(rows)
    position = table.column_names.index(feature)
    column = _exotic_columns(len(rows))[kind]
    table = table.set_column(position, feature, column)
    for content_type, body in ((ARROW, arrow_stream(table)), (PARQUET, _parquet_or_none(table))):
        if body is None:
            continue
        response = _send(client, body, content_type)
        if kind == "run_end" and content_type == ARROW:
            assert response.status_code == 422 and "run-end encoded" in response.text, response.text
            continue
        if kind in _VALID[feature]:
            assert response.status_code == 200, (content_type, response.text[:500])
            continue
        assert response.status_code == 422, (content_type, response.text[:500])
        details = response.json()["error"]["details"]
        assert details[0]["loc"] == ["body", "instances", 0, feature], details
        if kind in _TEXT_KINDS:  # text, as `instances` would send it
            plain = [{**row, feature: "red"} for row in rows]
            expected = _send(client, json.dumps({"instances": plain}).encode(), "application/json")
            assert details == expected.json()["error"]["details"]


def _parquet_or_none(table: pa.Table) -> bytes | None:
    try:
        return parquet_file(table)
    except (pa.ArrowException, NotImplementedError):
        return None  # a type Parquet cannot hold


class LinesStore(FakeStore):
    """Builds each batch's lines as the PostgreSQL store does when it writes them."""

    async def record_predictions(self, rows: list[Any]) -> None:
        for row in rows:
            if isinstance(row, PredictionBatch):
                row.lines(row.skip)
        self.predictions.extend(rows)


def _broken_lines(skip: int) -> bytes:
    raise TypeError("a value the line builder cannot write")


def test_a_record_whose_lines_cannot_be_built_is_dropped_alone():
    store = LinesStore()
    dropped: list[int] = []
    recorder = PredictionRecorder(store, 1.0, 1000, on_dropped=dropped.append)  # type: ignore[arg-type]
    recorder.record(
        [
            PredictionBatch("good-1", "m", "1", 4, _no_lines),
            PredictionBatch("broken", "m", "1", 6, _broken_lines),
            PredictionBatch("good-2", "m", "1", 2, _no_lines),
        ]
    )
    asyncio.run(recorder.flush())
    assert [b.request_id for b in store.predictions] == ["good-1", "good-2"] and dropped == [6]
    assert recorder.pending == 0
