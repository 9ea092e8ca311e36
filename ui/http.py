"""HTTP clients of the UI: the inference API (with the UI's key) and MLflow's REST API.

Every call carries a W3C traceparent, so the API's logs and spans join the UI's trace.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import quote

import httpx
from opentelemetry.trace import SpanKind

from core import telemetry, tracecontext
from core.settings import Settings
from ui.errors import ApiError, describe_response, describe_transport_error, error_code

log = logging.getLogger("ui.http")

NO_KEY_MESSAGE = (
    "The UI has no API key: set UI_API_KEY to one of the API's keys (with UI_API_KEY unset, "
    "`cluster up` registers one for the UI where DATABASE_URL is set, else hands it the first of API_KEYS)"
)


class _JsonHttp:
    """One service over HTTP: JSON in and out, failures as `ApiError` worded for people."""

    def __init__(self, service: str, base_url: str, timeout_s: float, transport: httpx.BaseTransport | None) -> None:
        self.service = service
        self.base_url = base_url.rstrip("/")
        self._client = httpx.Client(base_url=self.base_url, timeout=timeout_s, transport=transport)

    def close(self) -> None:
        self._client.close()

    def _headers(self) -> dict[str, str]:
        return {}

    def request(
        self, method: str, path: str, *, scope: str | None = None, blocked: str | None = None, **kwargs: Any
    ) -> Any:
        """`scope` and `blocked`: the API key scope the route needs and what this call is for, so
        that a key without it reads as what it stops on the page rather than as an error."""
        with telemetry.tracer("ui").start_as_current_span(f"{method} {path}", kind=SpanKind.CLIENT):
            headers = {**self._headers(), "traceparent": _traceparent()}
            started = time.perf_counter()
            try:
                response = self._client.request(method, path, headers=headers, **kwargs)
            except httpx.TransportError as exc:
                message = describe_transport_error(exc, self.service, self.base_url)
                log.warning("%s %s: %s", method, path, message)
                raise ApiError(message) from exc
            elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
            extra = {"status": response.status_code, "duration_ms": elapsed_ms, "upstream": self.service}
            if response.is_success:
                log.info("%s %s -> %d", method, path, response.status_code, extra=extra)
                return _json(response, self.service)
            message = describe_response(response, scope, blocked)
            log.warning("%s %s -> %d: %s", method, path, response.status_code, message, extra=extra)
            raise ApiError(message, response.status_code, error_code(response))


def _traceparent() -> str:
    # Without an exporter the active span is not sampled yet still has ids; outside any span
    # (tracing never initialised) a fresh trace id keeps the request findable in the API's logs.
    return telemetry.current_traceparent() or tracecontext.child_of(None)


def _json(response: httpx.Response, service: str) -> Any:
    try:
        return response.json()
    except ValueError as exc:
        raise ApiError(f"{service} answered {response.status_code} with a body that is not JSON") from exc


class InferenceApi(_JsonHttp):
    """The routes of the inference API the UI uses."""

    def __init__(
        self, base_url: str, api_key: str | None, timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        super().__init__("inference API", base_url, timeout_s, transport)
        self._api_key = api_key

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceApi:
        key = settings.ui.api_key.get_secret_value() if settings.ui.api_key is not None else None
        return cls(settings.resolved_ui_api_url, key, settings.ui.request_timeout_s)

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    def _headers(self) -> dict[str, str]:
        if not self._api_key:
            raise ApiError(NO_KEY_MESSAGE)
        return {"Authorization": f"Bearer {self._api_key}"}

    def openapi(self) -> dict[str, Any]:
        """The API's own description (public: no key). Only a nicety for the form's defaults, so
        a failure yields nothing rather than an error."""
        try:
            response = self._client.get("/openapi.json")
            return dict(response.json()) if response.is_success else {}
        except (httpx.HTTPError, ValueError):
            return {}

    def models(self) -> list[dict[str, Any]]:
        """Every model the API serves (`GET /v1/models`)."""
        blocked = "the served models cannot be listed here"
        return list(self.request("GET", "/v1/models", scope="predict", blocked=blocked).get("models", []))

    def current_model(self, model: str | None = None) -> dict[str, Any]:
        """The served version of `model`, or of the API's default model."""
        path = f"/v1/models/{quote(model, safe='')}" if model else "/v1/models/current"
        return dict(self.request("GET", path, scope="predict", blocked="the served model cannot be shown here"))

    def monitoring(self, model: str) -> dict[str, Any]:
        """Drift and estimated accuracy of the served version of `model` (`GET
        /v1/models/{name}/monitoring`)."""
        path = f"/v1/models/{quote(model, safe='')}/monitoring"
        blocked = "the model's drift cannot be shown here"
        return dict(self.request("GET", path, scope="predict", blocked=blocked))

    def predict(self, row: dict[str, Any], model: str | None = None) -> dict[str, Any]:
        path = f"/v1/models/{quote(model, safe='')}/predict" if model else "/v1/predict"
        blocked = "predictions cannot be made here"
        return dict(self.request("POST", path, json={"instances": [row]}, scope="predict", blocked=blocked))

    def feedback(self, request_id: str, label: str, index: int = 0) -> dict[str, Any]:
        body = {"request_id": request_id, "index": index, "label": label}
        blocked = "feedback cannot be sent from here"
        return dict(self.request("POST", "/v1/feedback", json=body, scope="feedback", blocked=blocked))

    def submit_job(self, spec: dict[str, Any]) -> dict[str, Any]:
        blocked = "training jobs cannot be started here"
        return dict(self.request("POST", "/v1/training-jobs", json=spec, scope="train", blocked=blocked))

    def job(self, job_id: str) -> dict[str, Any]:
        blocked = "training jobs cannot be followed here"
        return dict(self.request("GET", _job_path(job_id), scope="train", blocked=blocked))

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        blocked = "training jobs cannot be listed here"
        body = self.request("GET", "/v1/training-jobs", params={"limit": limit}, scope="train", blocked=blocked)
        return list(body.get("jobs", []))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """`DELETE /v1/training-jobs/{id}`: the job, now cancelled (also when it was already)."""
        blocked = "training jobs cannot be cancelled here"
        return dict(self.request("DELETE", _job_path(job_id), scope="train", blocked=blocked))


def _job_path(job_id: str) -> str:
    # A pasted id is text from a person: quoted, it cannot reach another route.
    return f"/v1/training-jobs/{quote(job_id, safe='')}"


class MlflowRest(_JsonHttp):
    """The few read-only routes of MLflow's REST API behind the model card."""

    def __init__(
        self, tracking_uri: str, timeout_s: float = 30.0, transport: httpx.BaseTransport | None = None
    ) -> None:
        super().__init__("MLflow", tracking_uri, timeout_s, transport)
        self._usable = tracking_uri.startswith(("http://", "https://"))

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self._usable:
            raise ApiError(f"MLflow's tracking URI {self.base_url!r} is not an HTTP server; the model card needs one")
        return super().request(method, path, **kwargs)

    def run(self, run_id: str) -> dict[str, Any]:
        return dict(self.request("GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id}).get("run", {}))

    def metric_history(self, run_id: str, key: str) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params = {"run_id": run_id, "metric_key": key, "max_results": 25000}
            body = self.request("GET", "/api/2.0/mlflow/metrics/get-history", params=params | _page(token))
            points += body.get("metrics", [])
            token = body.get("next_page_token")
            if not token:
                return points

    def model_versions(self, model_name: str) -> list[dict[str, Any]]:
        versions: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params = {"filter": f"name='{model_name}'", "max_results": 200}
            body = self.request("GET", "/api/2.0/mlflow/model-versions/search", params=params | _page(token))
            versions += body.get("model_versions", [])
            token = body.get("next_page_token")
            if not token:
                return versions

    def aliases(self, model_name: str) -> dict[str, str]:
        """Version -> its aliases (`champion`), comma-separated."""
        body = self.request("GET", "/api/2.0/mlflow/registered-models/get", params={"name": model_name})
        found: dict[str, list[str]] = {}
        for entry in body.get("registered_model", {}).get("aliases", []):
            found.setdefault(str(entry.get("version")), []).append(str(entry.get("alias")))
        return {version: ", ".join(names) for version, names in found.items()}


def _page(token: str | None) -> dict[str, str]:
    return {"page_token": token} if token else {}
