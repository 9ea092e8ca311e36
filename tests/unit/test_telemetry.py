"""Trace ids and structured logs: what ties a response, its log lines and its spans together."""

from __future__ import annotations

import json
import logging

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from core import telemetry
from core.logs import JsonFormatter, log_context
from serve_apps.context import RequestContextMiddleware

INCOMING = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def _record(message: str = "hello", **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("jobs.test", logging.INFO, __file__, 1, message, (), None)
    record.__dict__.update(extra)
    return record


def test_log_line_is_one_json_object_with_the_fixed_fields():
    line = JsonFormatter("dispatcher").format(_record("job x done", job_id="j-1"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["service"] == "dispatcher" and entry["level"] == "INFO" and entry["message"] == "job x done"
    assert entry["time"].endswith("Z") and "T" in entry["time"]
    assert {"trace_id", "span_id", "request_id"} <= entry.keys()
    assert entry["job_id"] == "j-1"


def test_log_context_and_active_span_fill_the_ids():
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with (
        tracer.start_as_current_span("op", context=telemetry.extract(INCOMING)),
        log_context(request_id="r-1", model_version="7"),
    ):
        entry = json.loads(JsonFormatter("inference-api").format(_record()))
    # An unsampled span still continues the caller's trace: logs correlate with tracing off.
    assert entry["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert len(entry["span_id"]) == 16 and entry["span_id"] != "b7ad6b7169203331"
    assert entry["request_id"] == "r-1" and entry["model_version"] == "7"
    outside = json.loads(JsonFormatter("inference-api").format(_record()))
    assert outside["request_id"] is None and outside["trace_id"] is None


def test_exceptions_are_kept_in_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(JsonFormatter("trainer").format(record))
    assert "ValueError: boom" in entry["exception"]


@pytest.mark.parametrize("bad", [None, "", "garbage", "00-" + "0" * 32 + "-b7ad6b7169203331-01"])
def test_a_malformed_traceparent_starts_a_new_trace(bad):
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with tracer.start_as_current_span("op", context=telemetry.extract(bad)):
        ids = telemetry.current_ids()
    assert ids is not None and ids[0] != "0" * 32


def test_current_traceparent_is_w3c():
    tracer = TracerProvider(sampler=ALWAYS_OFF).get_tracer("test")
    with tracer.start_as_current_span("op", context=telemetry.extract(INCOMING)):
        value = telemetry.current_traceparent()
    assert value is not None
    version, trace_id, span_id, _ = value.split("-")
    assert (version, trace_id) == ("00", "0af7651916cd43dd8448eb211c80319c") and len(span_id) == 16


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(RequestContextMiddleware)

    @app.get("/ids")
    def ids(request: Request) -> dict[str, str]:
        return {"request_id": request.state.request_id, "traceparent": request.state.traceparent}

    return app


def test_responses_carry_the_callers_trace_and_request_id():
    client = TestClient(_app())
    response = client.get("/ids", headers={"traceparent": INCOMING, "X-Request-ID": "abc-1"})
    assert response.headers["x-trace-id"] == "0af7651916cd43dd8448eb211c80319c"
    assert response.headers["traceparent"] == response.json()["traceparent"]
    assert response.headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"
    assert response.json()["request_id"] == "abc-1"


def test_responses_without_a_trace_get_a_new_one():
    client = TestClient(_app())
    first = client.get("/ids").headers["x-trace-id"]
    second = client.get("/ids", headers={"X-Request-ID": "x" * 500}).headers["x-trace-id"]
    assert len(first) == 32 and first != second
    assert client.get("/ids", headers={"X-Request-ID": "x" * 500}).json()["request_id"] != "x" * 500


def test_serve_access_lines_get_the_trace_of_their_request_id():
    from core.logs import TraceContextFilter, remember_trace

    remember_trace("req-42", "a" * 32, "b" * 16)
    record = _record("POST /v1/predict 200 3.1ms", request_id="req-42")
    assert TraceContextFilter("inference-api").filter(record)
    assert [record.__dict__[k] for k in ("trace_id", "span_id", "service")] == ["a" * 32, "b" * 16, "inference-api"]
    unknown = _record("GET /healthz 200", request_id="req-unknown")
    TraceContextFilter("inference-api").filter(unknown)
    assert not hasattr(unknown, "trace_id")
