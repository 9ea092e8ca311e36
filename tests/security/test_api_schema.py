"""The inference API against its own OpenAPI schema: Schemathesis generates requests for every
operation, with an admin key (API_KEYS), with a key holding only the `predict` scope and without
credentials, and sends them through Nginx over TLS to the session's stack. No response may be a
5xx, and every response must be documented: a status code the
operation declares, a declared content type, a body that matches the declared schema (the edge's
own 413/429/404 answers included). Requests that break the schema must be refused with a 4xx.

The run is bounded and reproducible: a fixed number of examples per operation, mode and
credential, drawn by a derandomized Hypothesis (the same requests on every run), no shrinking and
no example database. About a thousand requests in all.

Two operations start real training runs when they accept a request: `POST /v1/training-jobs`
and the Alertmanager webhook. With valid credentials they get schema-violating (negative) data
only, and any generated request whose body would still be accepted (Schemathesis may negate only
a header and keep a valid body, or a negation may become valid once serialised) is not sent: the
body is checked against the application's own request models first. Each such run then asserts
that the number of training jobs did not change. With the predict-only key and without
credentials both are fuzzed in both modes, as every other operation is: not one request may queue
a job.

The stateful phase chains operations through the links Schemathesis infers from the responses
(a job's `id` into `GET`/`DELETE /v1/training-jobs/{job_id}`, say) with a key that holds every
scope; the per-key job limit bounds what it can queue, and every job it queued is cancelled after.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from mlflow.tracking import MlflowClient
from pydantic import BaseModel, ValidationError
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core import NotSet
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from cluster.demo import wait_for_version
from cluster.sandbox import run_cli
from core.health import wait_until
from serve_apps.api import api as ingress_app
from serve_apps.schemas import AlertmanagerPayload
from services.training_jobs.models import JobSpec
from tests.conftest import ALERT_WEBHOOK_TOKEN

MAX_EXAMPLES = 30
# The stateful phase: scenarios of at most this many chained calls.
STATEFUL_SCENARIOS = 15
STATEFUL_STEPS = 6
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    # Generation is slow for the large nested bodies; that is expected, not a problem.
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# The operations the application declares; the served schema must list exactly these.
OPERATIONS = sorted(
    (method.upper(), path)
    for path, methods in ingress_app.openapi()["paths"].items()
    for method, operation in methods.items()
)


def _has_inputs(method: str, path: str) -> bool:
    """Whether there is anything to break: parameters or a body (else negative data cannot exist)."""
    operation = ingress_app.openapi()["paths"][path][method.lower()]
    return bool(operation.get("parameters") or operation.get("requestBody"))


# Operations whose accepted requests queue training jobs, and the model a body must fail to be refused.
JOB_STARTING: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/v1/training-jobs"): JobSpec,
    ("POST", "/v1/alerts/alertmanager"): AlertmanagerPayload,
}
assert set(JOB_STARTING) <= set(OPERATIONS)


# Who sends the requests: an admin key (API_KEYS), a key with only the `predict` scope, nobody.
CREDENTIALS = ("admin", "predict", "none")


def _runs() -> Iterator[Any]:
    for method, path in OPERATIONS:
        for credential in CREDENTIALS:
            modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if _has_inputs(method, path) else []
            modes = modes or [GenerationMode.POSITIVE]
            if credential == "admin" and (method, path) in JOB_STARTING:
                modes = [GenerationMode.NEGATIVE]
            for mode in modes:
                yield pytest.param(method, path, credential, mode, id=f"{method} {path} {credential} {mode.value}")


class Tally:
    """What the run did, printed at the end of the module for the report."""

    def __init__(self) -> None:
        self.sent: Counter[str] = Counter()
        self.withheld: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        # Requests sent with the predict-only key, and training jobs it got accepted (must stay 0).
        self.predict_key_requests = 0
        self.predict_key_jobs = 0
        self.stateful_requests = 0
        self.stateful_jobs = 0


@pytest.fixture(scope="module")
def tally(request: pytest.FixtureRequest, figures: dict[str, Any]) -> Iterator[Tally]:
    counts = Tally()
    yield counts
    figures["schemathesis"] = {
        "operations": len(OPERATIONS),
        "runs": len(counts.sent),
        "requests_sent": sum(counts.sent.values()),
        "withheld": sum(counts.withheld.values()),
        "statuses": {str(k): v for k, v in sorted(counts.statuses.items())},
        "predict_key_requests": counts.predict_key_requests,
        "jobs_started_with_predict_key": counts.predict_key_jobs,
        "stateful_requests": counts.stateful_requests,
        "stateful_jobs_queued": counts.stateful_jobs,
    }
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is not None and capture is not None:
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\nschemathesis: {len(counts.sent)} runs over {len(OPERATIONS)} operations, "
                f"{sum(counts.sent.values())} requests sent, {sum(counts.withheld.values())} withheld "
                f"(would have queued a training job), statuses {dict(sorted(counts.statuses.items()))}; "
                f"predict-only key: {counts.predict_key_requests} requests, {counts.predict_key_jobs} jobs queued; "
                f"stateful: {counts.stateful_requests} requests, {counts.stateful_jobs} jobs queued (all cancelled)"
            )


@pytest.fixture(scope="module")
def schema(stack, trained) -> schemathesis.BaseSchema:
    """The schema as users read it, from /openapi.json through Nginx; a model is loaded so that
    predictions and /v1/models/current answer."""
    # Whichever version earlier tests left as champion (the session's first one, or a later one).
    champion = MlflowClient(stack.settings.mlflow.tracking_uri).get_model_version_by_alias(
        stack.settings.model.name, stack.settings.champion_alias
    )
    assert wait_for_version(stack.settings, str(champion.version), 60), "the champion was not picked up"
    # Security schemes stay out of generation: each run sets (or leaves out) the credentials itself.
    config = schemathesis.Config.from_dict({"generation": {"with-security-parameters": False}})
    loaded = schemathesis.openapi.from_url(f"{stack.api_url}/openapi.json", config=config, verify=stack.verify)
    return loaded


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    # Each call passes `verify` itself: requests lets REQUESTS_CA_BUNDLE override a session's.
    with requests.Session() as http:
        yield http


def test_served_schema_lists_every_operation(schema):
    served = sorted((result.ok().method.upper(), result.ok().path) for result in schema.get_all_operations())
    assert served == OPERATIONS


def _job_count(session: requests.Session, stack) -> int:
    response = session.get(
        f"{stack.api_url}/v1/training-jobs", params={"limit": 200}, headers=stack.auth, verify=stack.verify
    )
    assert response.status_code == 200, response.text
    return len(response.json()["jobs"])


def _would_queue_a_job(case: Case[Any], model: type[BaseModel]) -> bool:
    """True when the body passes the operation's own request model: sent with valid credentials,
    it could be accepted. Bytes that are not JSON, and a missing body, are always refused."""
    body = case.body
    if isinstance(body, bytes):
        try:
            body = json.loads(body)
        except ValueError:
            return False
    elif isinstance(body, NotSet):
        return False
    try:
        parsed = model.model_validate(body)
    except ValidationError:
        return False
    if isinstance(parsed, AlertmanagerPayload):
        return any(a.status == "firing" and a.labels.get("action") == "retrain" for a in parsed.alerts)
    return True


def _add_key(stack, prefix: str, scopes: str) -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    added = run_cli("cluster", "keys", "add", name, "--scopes", scopes, env=stack.env, timeout=60)
    assert added.returncode == 0, added.stderr
    key = added.stdout.strip()
    deadline = 3 * stack.settings.api.key_refresh_s + 5
    headers = {"Authorization": f"Bearer {key}"}

    def known() -> bool:
        response = requests.get(f"{stack.api_url}/v1/models", headers=headers, verify=stack.verify, timeout=30)
        return response.status_code != 401

    assert wait_until(known, deadline), "the replicas did not pick the new key up"
    return key


@pytest.fixture(scope="module")
def predict_key(stack) -> str:
    return _add_key(stack, "schema-predict", "predict")


def _credentials(stack, path: str, credential: str, predict_key: str) -> dict[str, str]:
    if credential == "none":
        return {}
    if credential == "predict":
        return {"Authorization": f"Bearer {predict_key}"}
    token = ALERT_WEBHOOK_TOKEN if path == "/v1/alerts/alertmanager" else stack.api_key
    return {"Authorization": f"Bearer {token}"}


# The predict-only key sees fewer examples per run: it mostly meets 403s, which are cheap to check.
PREDICT_KEY_EXAMPLES = MAX_EXAMPLES // 3


@pytest.mark.parametrize(("method", "path", "credential", "mode"), list(_runs()))
def test_operation_conforms_to_its_schema(schema, session, stack, tally, predict_key, method, path, credential, mode):
    operation = schema[path][method]
    run = f"{method} {path} {credential} {mode.value}"
    guarded = JOB_STARTING.get((method, path)) if credential == "admin" else None
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    credentials = _credentials(stack, path, credential, predict_key)
    counts_jobs = guarded is not None or (method, path) in JOB_STARTING
    jobs_before = _job_count(session, stack) if counts_jobs else 0
    examples = PREDICT_KEY_EXAMPLES if credential == "predict" else MAX_EXAMPLES
    hypothesis_settings = settings(HYPOTHESIS, max_examples=examples)

    @hypothesis_settings
    @given(case=operation.as_strategy(mode))
    def check(case: Case[Any]) -> None:
        # Credentials are this run's, whatever was generated for the auth headers.
        for header in ("Authorization", "X-API-Key"):
            case.headers.pop(header, None)
        case.headers.update(credentials)
        if guarded is not None and _would_queue_a_job(case, guarded):
            tally.withheld[run] += 1
            return
        response = case.call(session=session, base_url=stack.api_url, verify=stack.verify)
        tally.sent[run] += 1
        tally.statuses[response.status_code] += 1
        if credential == "predict":
            tally.predict_key_requests += 1
            if (method, path) in JOB_STARTING and response.status_code < 300:
                tally.predict_key_jobs += 1
        case.validate_response(response, checks=checks)
        if guarded is not None or (credential != "admin" and (method, path) in JOB_STARTING):
            assert response.status_code >= 400, f"a training request was accepted: {response.text}"
        if credential == "predict" and path.startswith(("/v1/training-jobs", "/v1/feedback")):
            assert response.status_code in {401, 403, 404, 405, 413, 422, 429}, response.text
        if response.status_code >= 400:
            _assert_error_shape(response.json())

    check()
    assert tally.sent[run] > 0, "every generated request was withheld: nothing was tested"
    if counts_jobs:
        assert _job_count(session, stack) == jobs_before, "a training job was queued"


def test_stateful_sequences_conform_to_the_schema(schema, session, stack, tally):
    """Chains of calls, each response feeding the next request, with a key that holds every scope."""
    key = _add_key(stack, "schema-all", "predict,feedback,train,admin")
    headers = {"Authorization": f"Bearer {key}"}
    before = {job["id"] for job in _jobs(session, stack)}
    linked: Counter[str] = Counter()

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def before_call(self, case: Case[Any]) -> None:
            for header in ("Authorization", "X-API-Key"):
                case.headers.pop(header, None)
            if case.path == "/v1/alerts/alertmanager":
                # The webhook's token would queue retraining; unauthenticated it must answer 401.
                return
            case.headers.update(headers)

        def get_call_kwargs(self, case: Case[Any]) -> dict[str, Any]:
            return {"session": session, "base_url": stack.api_url, "verify": stack.verify}

        def after_call(self, response: Any, case: Case[Any]) -> None:
            tally.stateful_requests += 1
            tally.statuses[response.status_code] += 1
            if "{" in case.operation.path and case.path_parameters:
                linked[f"{case.method} {case.operation.path} {response.status_code}"] += 1

        def validate_response(self, response: Any, case: Case[Any], **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS)
            if response.status_code >= 400:
                _assert_error_shape(response.json())

    try:
        Machine.run(
            settings=settings(
                HYPOTHESIS, max_examples=STATEFUL_SCENARIOS, stateful_step_count=STATEFUL_STEPS, phases=[Phase.generate]
            )
        )
    finally:
        queued = [job for job in _jobs(session, stack) if job["id"] not in before]
        tally.stateful_jobs = len(queued)
        for job in queued:
            cancelled = session.delete(
                f"{stack.api_url}/v1/training-jobs/{job['id']}", headers=stack.auth, verify=stack.verify, timeout=30
            )
            assert cancelled.status_code in {200, 409}, cancelled.text
    # The links carried real ids: a job read or cancelled by the id its creation returned.
    reached = ("GET /v1/training-jobs/{job_id} 200", "DELETE /v1/training-jobs/{job_id} 200")
    assert any(step.startswith(reached) for step in linked), f"no stateful step reached a job by a link: {dict(linked)}"
    limit = stack.settings.training.max_active_per_key
    assert len(queued) <= stack.settings.training.max_per_hour_per_key and limit >= 1


def _jobs(session: requests.Session, stack) -> list[dict[str, Any]]:
    response = session.get(
        f"{stack.api_url}/v1/training-jobs", params={"limit": 200}, headers=stack.auth, verify=stack.verify
    )
    assert response.status_code == 200, response.text
    jobs: list[dict[str, Any]] = response.json()["jobs"]
    return jobs


def _assert_error_shape(body: Any) -> None:
    """The one error shape of the API, whoever answers (the replica or the edge)."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert {"code", "message", "request_id"} <= set(error) <= {"code", "message", "request_id", "details"}, body
    for detail in error.get("details") or []:
        assert isinstance(detail, dict) and isinstance(detail.get("msg"), str), body
    assert isinstance(error["code"], str) and isinstance(error["message"], str) and error["message"], body
