"""API failures reach the UI as one readable sentence."""

import httpx
import pytest

from core import tracecontext
from ui.errors import ApiError, describe_response, describe_transport_error, field_name
from ui.http import NO_KEY_MESSAGE, InferenceApi, MlflowRest


def _response(status: int, body: object = None, text: str | None = None) -> httpx.Response:
    if text is not None:
        return httpx.Response(status, text=text)
    return httpx.Response(status, json=body)


def test_refused_key():
    body = {"error": {"code": "unauthorized", "message": "invalid API key", "request_id": "r1"}}
    assert describe_response(_response(401, body)) == ("The API refused the key (401): invalid API key [request id r1]")


def test_validation_error_names_the_fields():
    body = {
        "error": {
            "code": "validation_error",
            "message": "invalid request",
            "details": [
                {"loc": ["body", "instances", 0, "age"], "msg": "Input should be a valid number"},
                {"loc": ["body", "overrides", "train.epochs"], "msg": "must be positive"},
            ],
        }
    }
    assert describe_response(_response(422, body)) == (
        "The API rejected the input (422): invalid request - age: Input should be a valid number; "
        "overrides.train.epochs: must be positive"
    )


@pytest.mark.parametrize(
    ("loc", "name"), [(["body", "instances", 0, "age"], "age"), (["body"], "request"), (None, "request")]
)
def test_field_name(loc, name):
    assert field_name(loc) == name


def test_bodies_that_are_not_the_api_s():
    assert describe_response(_response(502, text="<html>Bad Gateway</html>")) == (
        "The API answered with an error (502): <html>Bad Gateway</html>"
    )
    assert describe_response(_response(404, {"detail": "Not Found"})) == "Not found (404): Not Found"
    assert describe_response(_response(503, {"error": {"message": "no model loaded yet"}})) == (
        "The API is not ready (503): no model loaded yet"
    )


def test_transport_errors():
    url = "http://127.0.0.1:8000"
    refused = describe_transport_error(httpx.ConnectError("refused"), "inference API", url)
    assert refused == "inference API unreachable at http://127.0.0.1:8000 (connection refused or no route)"
    slow = describe_transport_error(httpx.ReadTimeout("slow"), "MLflow", url)
    assert slow == "MLflow at http://127.0.0.1:8000 did not answer in time (ReadTimeout)"


def test_client_maps_connection_refused():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("Connection refused", request=request)

    api = InferenceApi("http://127.0.0.1:9/", "key", transport=httpx.MockTransport(refuse))
    with pytest.raises(ApiError, match=r"^inference API unreachable at http://127.0.0.1:9 "):
        api.current_model()


def test_client_sends_key_and_traceparent_and_maps_errors():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(401, json={"error": {"message": "invalid API key"}})

    api = InferenceApi("http://api", "s3cret", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError) as raised:
        api.predict({"age": 1})
    assert raised.value.status == 401 and raised.value.message == "The API refused the key (401): invalid API key"
    assert seen[0].headers["Authorization"] == "Bearer s3cret"
    assert tracecontext.parse(seen[0].headers["traceparent"]) is not None


def test_client_without_a_key_says_so_and_sends_nothing():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={})

    api = InferenceApi("http://api", None, transport=httpx.MockTransport(handler))
    assert not api.has_key
    with pytest.raises(ApiError, match="no API key"):
        api.current_model()
    assert seen == [] and "UI_API_KEY" in NO_KEY_MESSAGE


def test_mlflow_needs_an_http_tracking_uri():
    with pytest.raises(ApiError, match="not an HTTP server"):
        MlflowRest("sqlite:///mlflow.db").run("r1")


def test_mlflow_history_follows_pages():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("page_token") == "p2":
            return httpx.Response(200, json={"metrics": [{"step": 1, "value": 0.4}]})
        return httpx.Response(200, json={"metrics": [{"step": 0, "value": 0.5}], "next_page_token": "p2"})

    mlflow = MlflowRest("http://mlflow", transport=httpx.MockTransport(handler))
    assert [p["step"] for p in mlflow.metric_history("r1", "val_loss")] == [0, 1]
