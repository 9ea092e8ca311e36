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


GRANT = (
    "an operator can grant it with `python -m cluster keys add <name> --scopes predict,feedback,train` and set "
    "UI_API_KEY to the new key (or leave UI_API_KEY unset: `cluster up` then registers a key with these scopes "
    "for the UI)."
)


def _missing_scope(message: str, scope: str | None = None) -> httpx.Response:
    detail: dict[str, object] = {"loc": ["header", "Authorization"], "msg": message, "type": "missing_scope"}
    if scope:
        detail["ctx"] = {"scope": scope}
    error = {"code": "missing_scope", "message": message, "request_id": "r3", "details": [detail]}
    return _response(403, {"error": error})


def test_a_missing_scope_says_what_it_blocks_and_how_to_grant_it():
    message = "this API key (ui-1) lacks the 'train' scope; an operator can grant it: python -m cluster keys add"
    refused = _missing_scope(message, "train")
    assert describe_response(refused, "train", "training jobs cannot be started here") == (
        f"This UI's API key lacks the 'train' scope, so training jobs cannot be started here; {GRANT} [request id r3]"
    )
    # The API names the scope; the caller's guess only fills in where it does not.
    assert describe_response(refused, "predict", "x").startswith("This UI's API key lacks the 'train' scope, so x;")
    in_message_only = _missing_scope(message)
    assert describe_response(in_message_only, "predict", "x").startswith("This UI's API key lacks the 'train' scope")
    unnamed = _missing_scope("forbidden")
    assert describe_response(unnamed, "feedback", "feedback cannot be sent from here").startswith(
        "This UI's API key lacks the 'feedback' scope, so feedback cannot be sent from here;"
    )
    assert describe_response(unnamed).startswith(
        "This UI's API key lacks a scope this needs, so this part of the page does not work;"
    )
    # The UI is never given admin: granting it is not the way out.
    admin = describe_response(_missing_scope("no", "admin"), None, "x")
    assert admin == (
        "This UI's API key lacks the 'admin' scope, so x; that takes an admin key, which the UI is never given: "
        "use the API with one. [request id r3]"
    )


def test_other_refusals_stay_as_they_were():
    forbidden = _response(403, {"error": {"code": "forbidden", "message": "not yours"}})
    assert describe_response(forbidden, "train", "x") == "The API refused access (403): not yours"


def test_too_many_requests_says_when_to_try_again():
    body = {"error": {"code": "job_limit_exceeded", "message": "this key has 2 jobs queued or running"}}
    limited = httpx.Response(429, json=body, headers={"Retry-After": "30"})
    assert (
        describe_response(limited)
        == "Job limit reached (429): this key has 2 jobs queued or running; try again in 30 s"
    )
    dated = httpx.Response(
        429, json={"error": {"message": "slow down"}}, headers={"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}
    )
    assert describe_response(dated) == (
        "Too many requests (429): slow down; try again after Wed, 21 Oct 2026 07:28:00 GMT"
    )
    assert describe_response(_response(429, {"error": {"message": "slow down"}})) == (
        "Too many requests (429): slow down; try again shortly"
    )
    # Only where waiting is the answer.
    ignored = httpx.Response(404, json={"error": {"message": "gone"}}, headers={"Retry-After": "30"})
    assert describe_response(ignored) == "Not found (404): gone"


def test_a_job_that_has_ended_cannot_be_cancelled():
    body = {"error": {"code": "job_finished", "message": "job j1 has already ended: succeeded", "request_id": "r4"}}
    assert describe_response(_response(409, body)) == (
        "The job has already ended (409): job j1 has already ended: succeeded [request id r4]"
    )


def test_the_client_keeps_the_api_s_error_code():
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.method == "DELETE" and request.url.raw_path == b"/v1/training-jobs/a%2Fb"
        return _missing_scope("this API key lacks the 'train' scope")

    api = InferenceApi("http://api", "k", transport=httpx.MockTransport(handler))
    with pytest.raises(ApiError) as raised:
        api.cancel_job("a/b")
    assert raised.value.missing_scope and (raised.value.status, raised.value.code) == (403, "missing_scope")
    assert raised.value.message.startswith(
        "This UI's API key lacks the 'train' scope, so training jobs cannot be cancelled here;"
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
