"""Hostile input through Nginx over TLS: each request gets a clear 4xx in the API's error shape,
with a message that says what to change, and none of them disturbs the replica (same process,
predictions keep working, prediction rows keep reaching PostgreSQL)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.sandbox import replica_pids
from serve_apps.schemas import EXAMPLE_ROW, ErrorResponse
from tests.stack_probes import champion_client

ROW_JSON = json.dumps(EXAMPLE_ROW)


@pytest.fixture(scope="module")
def api(stack, trained) -> Iterator[httpx.Client]:
    with champion_client(stack) as client:
        yield client


@pytest.fixture(scope="module")
def replica(stack, api) -> int:
    """The one ingress replica, before any hostile request; the last test checks it is still this one."""
    pids = replica_pids(stack.settings)
    assert len(pids) == 1, pids
    return pids[0]


def refused(response: httpx.Response, status: int, *, code: str | None = None, says: str = "") -> dict[str, Any]:
    """The response is `status` with the API's JSON error shape; returns the error object."""
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"].startswith("application/json"), response.headers
    error = ErrorResponse.model_validate(response.json()).error
    if code is not None:
        assert error.code == code, error
    assert says.lower() in error.message.lower(), error.message
    assert error.request_id == response.headers["x-request-id"]
    body: dict[str, Any] = response.json()["error"]
    return body


def names(error: dict[str, Any], loc: list[Any]) -> bool:
    return any(detail["loc"][: len(loc)] == loc for detail in error.get("details") or [])


def predicts(api: httpx.Client, rows: int = 1) -> dict[str, Any]:
    response = api.post("/v1/predict", json={"instances": [EXAMPLE_ROW] * rows})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert len(body["predictions"]) == rows
    return body


def raw(api: httpx.Client, body: str | bytes, content_type: str | None = "application/json") -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    request = api.build_request("POST", "/v1/predict", content=body, headers=headers)
    if content_type is None:
        request.headers.pop("Content-Type", None)  # httpx adds none for raw bytes; make sure
    return api.send(request)


def test_body_over_the_edge_limit_is_a_413_in_the_error_shape(api, stack, replica):
    limit = stack.settings.api.max_body_size  # "2m" unless configured otherwise
    padding = "x" * (3 * 1024 * 1024)
    response = api.post("/v1/predict", json={"instances": [{**EXAMPLE_ROW, "native_country": padding}]})
    error = refused(response, 413, code="payload_too_large", says=limit)
    assert "fewer instances" in error["message"]


@pytest.mark.parametrize(
    "body",
    [
        pytest.param("[" * 10_000 + "]" * 10_000, id="10k-nested-arrays"),
        pytest.param('{"instances": ' + "[" * 10_000 + "]" * 10_000 + "}", id="10k-nested-instances"),
        pytest.param('{"a":' * 10_000 + "1" + "}" * 10_000, id="10k-nested-objects"),
    ],
)
def test_deeply_nested_json_is_a_422_and_the_replica_keeps_serving(api, stack, replica, body):
    refused(raw(api, body), 422, code="validation_error", says="nested too deeply")
    predicts(api)
    assert replica_pids(stack.settings) == [replica]


def test_nesting_inside_a_feature_value_names_the_field(api, replica):
    value = "[" * 500 + "]" * 500  # parses, but is no number
    body = ROW_JSON.replace('"age": 39', f'"age": {value}')
    error = refused(raw(api, f'{{"instances": [{body}]}}'), 422, code="validation_error", says="age")
    assert names(error, ["body", "instances", 0, "age"])


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400])
@pytest.mark.parametrize("field", ["age", "capital_gain"])
def test_non_finite_or_overflowing_numbers_are_a_422_naming_the_field(api, replica, literal, field):
    """Python's json reads NaN, Infinity and 1e400 (as inf) and integers of any size; none is a
    number the model can use, and a 400-digit integer must not reach (and fail) the joined batch."""
    row = ROW_JSON.replace(f'"{field}": {EXAMPLE_ROW[field]}', f'"{field}": {literal}')
    error = refused(raw(api, f'{{"instances": [{row}]}}'), 422, code="validation_error", says=field)
    assert names(error, ["body", "instances", 0, field])
    assert any("finite number" in d["msg"] for d in error["details"]), error


def test_nan_in_feedback_index_is_a_422_naming_the_field(api, replica):
    body = '{"request_id": "abc", "index": NaN, "label": ">50K"}'
    response = api.post("/v1/feedback", content=body, headers={"Content-Type": "application/json"})
    error = refused(response, 422, code="validation_error", says="index")
    assert names(error, ["body", "index"])


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        pytest.param(json.dumps({"instances": [EXAMPLE_ROW]}), "text/plain", id="text-plain"),
        pytest.param("instances=1", "application/x-www-form-urlencoded", id="form-encoded"),
        pytest.param(
            b'--b\r\nContent-Disposition: form-data; name="instances"\r\n\r\n1\r\n--b--\r\n',
            "multipart/form-data; boundary=b",
            id="multipart",
        ),
        pytest.param(json.dumps({"instances": [EXAMPLE_ROW]}), None, id="no-content-type"),
        pytest.param(b'{"instances": [', "application/json", id="truncated-json"),
        pytest.param(b"\xff\xfe", "application/json", id="utf16-bom-only"),
        pytest.param(b'{"instances": ["\xff\xfe\xfd"]}', "application/json", id="invalid-utf8"),
    ],
)
def test_a_body_that_is_not_a_json_object_asks_for_application_json(api, replica, content, content_type):
    refused(raw(api, content, content_type), 422, code="validation_error", says="Content-Type: application/json")


def test_a_json_array_instead_of_an_object_asks_for_an_object(api, replica):
    response = api.post("/v1/predict", json=[{"instances": [EXAMPLE_ROW]}])
    error = refused(response, 422, code="validation_error", says="send a JSON object")
    assert names(error, ["body"])


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("\U0001f600\U0001f680", id="emoji"),
        pytest.param("\u05e2\u05d1\u05e8\u05d9\u05ea\u202e", id="rtl-and-override"),
        pytest.param("State\u0000-gov", id="nul-byte"),
        pytest.param("\ud800", id="lone-surrogate"),
        pytest.param("x" * 500_000, id="half-a-megabyte"),
    ],
)
def test_unknown_categories_are_a_422_naming_the_field_and_the_choices(api, replica, value):
    """The model only accepts categories it was trained on (the schema lists them): anything else,
    however odd its characters, is refused by name before it reaches the model or PostgreSQL."""
    # ensure_ascii escapes the lone surrogate as \\ud800, as a client would have to send it.
    row = json.dumps({**EXAMPLE_ROW, "workclass": value}, ensure_ascii=True)
    error = refused(raw(api, f'{{"instances": [{row}]}}'), 422, code="validation_error", says="workclass")
    assert names(error, ["body", "instances", 0, "workclass"])
    detail = next(d for d in error["details"] if d["loc"][-1] == "workclass")
    assert detail["type"] == "unknown_category" and "State-gov" in detail["msg"]
    assert len(detail["msg"]) < 1000  # the value is echoed only in part


@pytest.mark.parametrize(
    "key",
    [pytest.param("\u0000", id="nul-byte"), pytest.param("\ud800", id="lone-surrogate"), pytest.param("\U0001f600")],
)
def test_odd_field_names_are_a_422_naming_the_unknown_field(api, replica, key):
    row = json.dumps({**EXAMPLE_ROW, key: 1}, ensure_ascii=True)
    error = refused(raw(api, f'{{"instances": [{row}]}}'), 422, code="validation_error", says="instances.0.")
    assert any(d["type"] == "extra_forbidden" for d in error["details"]), error


@pytest.mark.parametrize(
    "request_id", [pytest.param("abc\u0000", id="nul-byte"), pytest.param("\ud800", id="lone-surrogate")]
)
def test_feedback_for_an_unprintable_request_id_is_a_422(api, replica, request_id):
    """Request ids the API hands out are printable; PostgreSQL's text type cannot hold a NUL."""
    body = json.dumps({"request_id": request_id, "index": 0, "label": ">50K"}, ensure_ascii=True)
    response = api.post("/v1/feedback", content=body, headers={"Content-Type": "application/json"})
    error = refused(response, 422, code="validation_error", says="request_id")
    assert names(error, ["body", "request_id"])


def test_prediction_rows_still_reach_postgresql_after_hostile_input(api, replica):
    """A true label for a prediction made after every request above is accepted: its row was
    recorded, so no hostile value is stuck in (and blocking) the recorder's buffer."""
    prediction = predicts(api)
    label = prediction["predictions"][0]["label"]
    response = api.post("/v1/feedback", json={"request_id": prediction["request_id"], "index": 0, "label": label})
    assert response.status_code == 201, response.text
    assert response.json()["outcome"] == "recorded" and response.json()["correct"] is True


def test_more_rows_than_the_limit_is_a_422_naming_the_limit(api, stack, replica):
    limit = stack.settings.max_batch_rows  # 50 in the test stack
    response = api.post("/v1/predict", json={"instances": [EXAMPLE_ROW] * (limit + 1)})
    error = refused(response, 422, code="validation_error", says=f"at most {limit}")
    assert names(error, ["body", "instances"])
    predicts(api, rows=limit)  # the limit itself is fine


def test_an_empty_instances_list_asks_for_at_least_one(api, replica):
    error = refused(api.post("/v1/predict", json={"instances": []}), 422, code="validation_error", says="at least 1")
    assert names(error, ["body", "instances"])


def test_duplicate_keys_validate_the_value_the_model_uses(api, replica):
    """Python's json keeps the last of duplicate keys; validation sees that same parsed value, so
    a duplicate cannot smuggle a value past the checks (no parser differential)."""
    row = ROW_JSON[:-1]
    bad_last = raw(api, f'{{"instances": [{row}, "age": "forty"}}]}}')
    error = refused(bad_last, 422, code="validation_error", says="age")
    assert names(error, ["body", "instances", 0, "age"])
    good_last = raw(api, f'{{"instances": [{{"age": "forty", {row[1:]}}}]}}')
    assert good_last.status_code == 200, good_last.text
    empty_last = raw(api, f'{{"instances": [{ROW_JSON}], "instances": []}}')
    refused(empty_last, 422, code="validation_error", says="at least 1")


@pytest.mark.parametrize("request_id", ["r" * 5000, "id with spaces", "tab\there"])
def test_an_unusable_caller_request_id_is_replaced_not_echoed(api, replica, request_id):
    """Echoed back by Serve, a 5,000-character id overflowed the edge's buffer for upstream
    response headers (502); ids outside 1-128 visible ASCII characters are replaced at the edge."""
    response = api.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers={"X-Request-ID": request_id})
    assert response.status_code == 200, response.text
    assert response.json()["request_id"] == response.headers["x-request-id"] != request_id
    assert len(response.json()["request_id"]) <= 128


def test_the_replica_survived_every_hostile_request(api, stack, replica):
    """Runs last (pytest keeps the file's order): the same replica process serves a normal prediction."""
    predicts(api)
    assert replica_pids(stack.settings) == [replica]
