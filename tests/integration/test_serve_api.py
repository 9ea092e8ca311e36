"""The Serve application over real HTTP: auth, predictions, and every kind of bad input."""

import httpx
import pytest

from cluster.demo import wait_for_version
from serve_apps.schemas import EXAMPLE_ROW


@pytest.fixture(scope="module")
def api(stack, trained):
    version = str(trained["model_version"])
    assert wait_for_version(stack.settings, version, 60), "the champion was not picked up"
    with httpx.Client(base_url=stack.api_url, verify=stack.verify, timeout=30) as client:
        yield client


def test_health_needs_no_key(api):
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200


def test_prediction_with_bearer_key(api, stack, trained):
    response = api.post(
        "/v1/predict", json={"instances": [EXAMPLE_ROW, {**EXAMPLE_ROW, "age": 52}]}, headers=stack.auth
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {
        "name": "adult-income",
        "version": str(trained["model_version"]),
        "run_id": trained["run_id"],
    }
    assert len(body["predictions"]) == 2
    for prediction in body["predictions"]:
        assert prediction["label"] in {"<=50K", ">50K"}
        assert 0.5 <= prediction["probability"] <= 1
        assert abs(sum(prediction["probabilities"].values()) - 1) < 1e-5
    assert body["request_id"] == response.headers["x-request-id"]


def test_prediction_with_x_api_key_and_second_key(api, stack):
    assert (
        api.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers={"X-API-Key": stack.api_key}).status_code
        == 200
    )
    second = {"X-API-Key": f"second-{stack.api_key}"}
    assert api.post("/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers=second).status_code == 200


def test_caller_request_id_is_echoed(api, stack):
    response = api.post(
        "/v1/predict", json={"instances": [EXAMPLE_ROW]}, headers={**stack.auth, "X-Request-ID": "abc-123"}
    )
    assert response.json()["request_id"] == "abc-123"


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "wrong"}, {"Authorization": "Basic Zm9vOmJhcg=="}],
)
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/predict"), ("GET", "/v1/models/current")])
def test_missing_or_wrong_key_gets_401_json(api, headers, method, path):
    response = api.request(method, path, json={"instances": [EXAMPLE_ROW]}, headers=headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def _row_without(field):
    return {k: v for k, v in EXAMPLE_ROW.items() if k != field}


@pytest.mark.parametrize(
    ("payload", "loc"),
    [
        ({"instances": [_row_without("age")]}, ["body", "instances", 0, "age"]),
        ({"instances": [{**EXAMPLE_ROW, "age": "forty"}]}, ["body", "instances", 0, "age"]),
        (
            {"instances": [EXAMPLE_ROW, {**EXAMPLE_ROW, "workclass": "Astronaut"}]},
            ["body", "instances", 1, "workclass"],
        ),
        ({"instances": [{**EXAMPLE_ROW, "sex": None}]}, ["body", "instances", 0, "sex"]),
        ({"instances": [{**EXAMPLE_ROW, "agee": 3}]}, ["body", "instances", 0, "agee"]),
        ({"rows": [EXAMPLE_ROW]}, ["body", "instances"]),
        ({"instances": ["not an object"]}, ["body", "instances", 0]),
    ],
)
def test_bad_input_gets_422_naming_the_field(api, stack, payload, loc):
    response = api.post("/v1/predict", json=payload, headers=stack.auth)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    assert any(detail["loc"][: len(loc)] == loc for detail in error["details"]), error


def test_unknown_route_is_a_json_404(api):
    # Hostile and malformed input (empty or oversized batches, bodies that are not JSON objects)
    # is covered in tests/security/test_bad_input.py.
    for path in ("/v1/nope", "/nope"):  # answered by the replica, then by Nginx
        response = api.get(path)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"


def test_current_model_describes_schema_and_metrics(api, stack, trained):
    body = api.get("/v1/models/current", headers=stack.auth).json()
    assert body["version"] == str(trained["model_version"]) and body["alias"] == "champion"
    names = [f["name"] for f in body["features"]]
    assert names[:3] == ["age", "workclass", "fnlwgt"]
    assert body["classes"] == ["<=50K", ">50K"]
    assert "test_roc_auc" in body["metrics"]


def test_openapi_documents_the_routes_and_auth(api):
    spec = api.get("/openapi.json").json()
    assert {"/healthz", "/readyz", "/v1/predict", "/v1/models/current"} <= set(spec["paths"])
    assert {"HTTPBearer", "APIKeyHeader"} <= set(spec["components"]["securitySchemes"])
    assert api.get("/docs").status_code == 200
