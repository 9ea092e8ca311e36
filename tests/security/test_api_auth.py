"""Every route of the inference API, read from its own OpenAPI document (a new route is covered
without touching this file), through Nginx, with no key, a wrong key, a revoked key and a valid one;
every route by every scope (a key with only that scope: the route answers or gives 403 naming the
scope it needs); a key restricted to one model; and keys added and revoked with
`python -m cluster keys` while the API serves."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
import pytest

from cluster.sandbox import Stack, run_cli
from core.health import wait_until
from tests.conftest import ALERT_WEBHOOK_TOKEN
from tests.edge_helpers import require_edge

# Public by design: liveness and readiness for load balancers and orchestrators, and the API's
# documentation. Anything else the OpenAPI document lists must ask for credentials.
PUBLIC_ROUTES = {("get", "/healthz"), ("get", "/readyz")}
PUBLIC_DOCS = ["/docs", "/openapi.json"]
# Routes that take Alertmanager's webhook token rather than a user's API key.
ALERT_ROUTES = {("post", "/v1/alerts/alertmanager")}
HTTP_METHODS = {"get", "post", "put", "patch", "delete"}
# The scope each route needs (admin holds every scope). Every secured route must be listed: a new
# route fails `test_every_route_needs_a_known_scope` until someone decides who may call it.
ROUTE_SCOPES: dict[tuple[str, str], str] = {
    ("post", "/v1/predict"): "predict",
    ("post", "/v1/models/{name}/predict"): "predict",
    ("get", "/v1/models"): "predict",
    ("get", "/v1/models/current"): "predict",
    ("get", "/v1/models/{name}"): "predict",
    ("get", "/v1/models/{name}/monitoring"): "predict",
    ("post", "/v1/feedback"): "feedback",
    ("post", "/v1/training-jobs"): "train",
    ("get", "/v1/training-jobs"): "train",
    ("get", "/v1/training-jobs/{job_id}"): "train",
    ("delete", "/v1/training-jobs/{job_id}"): "train",
}
SCOPES = ["predict", "feedback", "train", "admin"]
# The process title of an ingress replica of the `inference` Serve application.
REPLICA_TITLE = "ServeReplica:inference:Ingress"


@dataclass(frozen=True)
class Operation:
    method: str
    template: str
    path: str  # the template with valid path parameters filled in
    has_body: bool
    secured: bool

    @property
    def key(self) -> tuple[str, str]:
        return self.method, self.template

    def __str__(self) -> str:
        return f"{self.method.upper()} {self.template}"


def path_value(schema: dict[str, Any]) -> str:
    """A value a path parameter of this schema accepts, so that a request passes routing."""
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    if schema.get("type") == "integer":
        return "1"
    return "x"


def operations_of(openapi: dict[str, Any]) -> list[Operation]:
    found = []
    for template, item in openapi["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            path = template
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    path = path.replace("{" + parameter["name"] + "}", path_value(parameter.get("schema", {})))
            secured = bool(operation.get("security"))
            found.append(Operation(method, template, path, "requestBody" in operation, secured))
    return found


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    return require_edge(stack)


@pytest.fixture(scope="module")
def operations(edge: Stack) -> list[Operation]:
    response = edge.http.get("/openapi.json")
    assert response.status_code == 200
    found = operations_of(response.json())
    assert {op.key for op in found} >= PUBLIC_ROUTES | ALERT_ROUTES | {("post", "/v1/predict")}
    return found


def add_key(stack: Stack, name: str, scopes: str = "predict,feedback,train", models: str | None = None) -> str:
    extra = ["--models", models] if models else []
    added = run_cli("cluster", "keys", "add", name, "--scopes", scopes, *extra, env=stack.env, timeout=60)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    assert len(key) >= 32 and "\n" not in key
    return key


def revoke_key(stack: Stack, name: str) -> None:
    revoked = run_cli("cluster", "keys", "revoke", name, env=stack.env, timeout=60)
    assert revoked.returncode == 0, revoked.stderr


@pytest.fixture(scope="module")
def revoked_key(edge: Stack) -> str:
    name = f"matrix-{uuid.uuid4().hex[:8]}"
    key = add_key(edge, name)
    revoke_key(edge, name)

    # The replicas may have accepted the key in between: wait for their next read of the table.
    def refused() -> bool:
        return edge.http.get("/v1/models/current", headers=bearer(key)).status_code == 401

    assert wait_until(refused, refresh_deadline(edge)), "the revoked key was still accepted"
    return key


def refresh_deadline(stack: Stack) -> float:
    """API_KEY_REFRESH_S (1 s in the tests) and a margin for a loaded machine."""
    return 3 * stack.settings.api.key_refresh_s + 5


def call(stack: Stack, op: Operation, headers: dict[str, str]) -> httpx.Response:
    if not op.has_body:
        return stack.http.request(op.method.upper(), op.path, headers=headers)
    # A JSON array where an object is expected: a request that gets past authentication stops at
    # validation (422), so no route here queues a job or records anything.
    json_headers = {**headers, "Content-Type": "application/json"}
    return stack.http.request(op.method.upper(), op.path, content=b"[]", headers=json_headers)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_only_health_checks_are_public(operations: list[Operation]) -> None:
    unsecured = {op.key for op in operations if not op.secured}
    assert unsecured == PUBLIC_ROUTES, f"routes without authentication: {sorted(unsecured - PUBLIC_ROUTES)}"


def test_public_routes_answer_without_a_key(edge: Stack, operations: list[Operation]) -> None:
    for op in operations:
        if op.key in PUBLIC_ROUTES:
            response = call(edge, op, {})
            # /readyz is 503 until a model is loaded: public either way, never 401.
            assert response.status_code in {200, 503}, (str(op), response.status_code, response.text)
    for path in PUBLIC_DOCS:
        response = edge.http.get(path)
        assert response.status_code == 200, (path, response.status_code)


@pytest.mark.parametrize("credential", ["none", "wrong", "revoked", "api key on the alert route"])
def test_every_route_refuses_without_valid_credentials(
    edge: Stack, operations: list[Operation], revoked_key: str, credential: str
) -> None:
    def headers(op: Operation) -> list[dict[str, str]]:
        if credential == "none":
            return [{}]
        if credential == "wrong":
            return [bearer(f"wrong-{uuid.uuid4().hex}"), {"X-API-Key": f"wrong-{uuid.uuid4().hex}"}]
        if credential == "revoked":
            return [bearer(revoked_key), {"X-API-Key": revoked_key}]
        # A user's key cannot start retraining through Alertmanager's webhook.
        return [edge.auth] if op.key in ALERT_ROUTES else []

    failures = []
    for op in operations:
        if op.key in PUBLIC_ROUTES:
            continue
        for sent in headers(op):
            response = call(edge, op, sent)
            problem = unauthorized_problem(response)
            if problem:
                failures.append(f"{op} with {sorted(sent)}: {problem}")
    assert not failures, "\n".join(failures)


def unauthorized_problem(response: httpx.Response) -> str | None:
    """What is wrong with a response that should be a 401 in the API's error shape; None if nothing."""
    if response.status_code != 401:
        return f"status {response.status_code}, not 401: {response.text[:200]}"
    if response.headers.get("www-authenticate") != "Bearer":
        return "no WWW-Authenticate: Bearer"
    error = response.json().get("error", {})
    if error.get("code") != "unauthorized" or "Authorization: Bearer <" not in error.get("message", ""):
        return f"unclear error: {error}"
    return None


def test_every_route_admits_a_valid_key(edge: Stack, operations: list[Operation]) -> None:
    failures = []
    for op in operations:
        if op.key in PUBLIC_ROUTES:
            continue
        token = ALERT_WEBHOOK_TOKEN if op.key in ALERT_ROUTES else edge.api_key
        for sent in [bearer(token)] + ([] if op.key in ALERT_ROUTES else [{"X-API-Key": token}]):
            response = call(edge, op, sent)
            if response.status_code in {401, 403}:
                failures.append(f"{op} with {sorted(sent)}: {response.status_code} {response.text[:200]}")
            elif op.has_body and response.status_code != 422:
                failures.append(f"{op}: the invalid body was not refused: {response.status_code}")
    assert not failures, "\n".join(failures)


def replica_pids(stack: Stack) -> set[int]:
    """The ingress replicas of this stack (other stacks may run on the machine too)."""
    pids = set()
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if REPLICA_TITLE in " ".join(proc.info["cmdline"] or []) and (
                proc.environ().get("STATE_DIR") == str(stack.settings.state_dir)
            ):
                pids.add(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def test_keys_are_added_and_revoked_without_a_restart(edge: Stack) -> None:
    replicas = replica_pids(edge)
    assert replicas, "no ingress replica of this stack found"
    name = f"rotation-{uuid.uuid4().hex[:8]}"
    key = add_key(edge, name)
    deadline = refresh_deadline(edge)

    def status_with(key: str) -> int:
        return edge.http.get("/v1/models/current", headers=bearer(key)).status_code

    assert wait_until(lambda: status_with(key) != 401, deadline), "the added key was not accepted in time"
    listed = run_cli("cluster", "keys", "list", env=edge.env, timeout=60)
    assert listed.returncode == 0 and name in listed.stdout
    assert key not in listed.stdout + listed.stderr

    revoke_key(edge, name)
    assert wait_until(lambda: status_with(key) == 401, deadline), "the revoked key was still accepted"
    assert status_with(edge.api_key) != 401, "revoking one key must leave the others alone"
    assert replicas <= replica_pids(edge), "an ingress replica was restarted"


def test_every_route_needs_a_known_scope(operations: list[Operation]) -> None:
    secured = {op.key for op in operations if op.key not in PUBLIC_ROUTES | ALERT_ROUTES}
    assert secured == set(ROUTE_SCOPES), (
        f"routes without a scope here: {sorted(secured - set(ROUTE_SCOPES))}; "
        f"listed but gone: {sorted(set(ROUTE_SCOPES) - secured)}"
    )


@pytest.fixture(scope="module")
def scoped_keys(edge: Stack) -> dict[str, str]:
    """One key per scope, holding that scope only."""
    suffix = uuid.uuid4().hex[:8]
    keys = {scope: add_key(edge, f"scope-{scope}-{suffix}", scope) for scope in SCOPES}
    deadline = refresh_deadline(edge)

    def known(key: str) -> bool:
        # Any answer but 401 means the replicas know the key (a 403 is an answer about its scope).
        return edge.http.get("/v1/models", headers=bearer(key)).status_code != 401

    for key in keys.values():
        assert wait_until(lambda: known(key), deadline)  # noqa: B023 - called before the loop moves on
    return keys


def test_every_route_by_every_scope(edge: Stack, operations: list[Operation], scoped_keys: dict[str, str]) -> None:
    matrix: dict[str, dict[str, int]] = {}
    failures = []
    for op in operations:
        if op.key not in ROUTE_SCOPES:
            continue
        needed = ROUTE_SCOPES[op.key]
        for scope, key in scoped_keys.items():
            response = call(edge, op, bearer(key))
            matrix.setdefault(str(op), {})[scope] = response.status_code
            allowed = scope in {needed, "admin"}
            if allowed and response.status_code in {401, 403}:
                failures.append(f"{op} with a {scope} key: {response.status_code} {response.text[:200]}")
            if not allowed:
                error = response.json().get("error", {}) if response.status_code == 403 else {}
                if response.status_code != 403 or error.get("code") != "missing_scope":
                    failures.append(f"{op} with a {scope} key: {response.status_code}, not 403 missing_scope")
                elif f"'{needed}'" not in error.get("message", ""):
                    failures.append(f"{op} with a {scope} key: the 403 does not name the {needed!r} scope: {error}")
    rows = [f"{route:42} " + " ".join(f"{s}={c}" for s, c in row.items()) for route, row in matrix.items()]
    print("\nscope matrix (status per key scope):\n" + "\n".join(rows))
    assert not failures, "\n".join(failures)


def test_a_key_restricted_to_a_model_is_told_the_others_do_not_exist(edge: Stack) -> None:
    default = edge.settings.model.name
    name = f"restricted-{uuid.uuid4().hex[:8]}"
    other = add_key(edge, name, "predict,train", models="some-other-model")
    deadline = refresh_deadline(edge)
    assert wait_until(lambda: edge.http.get("/v1/models", headers=bearer(other)).status_code == 200, deadline)

    listed = edge.http.get("/v1/models", headers=bearer(other)).json()["models"]
    assert [m["name"] for m in listed if m["name"] == default] == [], "the list shows a model the key may not use"
    for method, path in [
        ("GET", f"/v1/models/{default}"),
        ("GET", f"/v1/models/{default}/monitoring"),
        ("GET", "/v1/models/current"),
        ("POST", "/v1/predict"),
        ("POST", f"/v1/models/{default}/predict"),
    ]:
        response = edge.http.request(method, path, headers=bearer(other), json={"instances": [{"x": 1}]})
        assert response.status_code == 404, (method, path, response.status_code, response.text)
        assert response.json()["error"]["code"] == "model_not_found"
    # The shipped default config registers the default model, which this key may not train.
    refused = edge.http.post("/v1/training-jobs", headers=bearer(other), json={"kind": "train"})
    assert refused.status_code == 403, refused.text
    assert refused.json()["error"]["code"] == "model_not_allowed" and default in refused.json()["error"]["message"]
