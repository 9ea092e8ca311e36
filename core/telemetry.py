"""Tracing: one OpenTelemetry tracer provider per process, exporting over OTLP/HTTP when an
endpoint is configured.

Without an endpoint the provider samples nothing: spans are not recorded or exported, yet each
still gets a trace id, so logs and response headers stay correlated at the cost of two random
numbers per span. Serve components get their provider from Serve's own tracing hook
(`serve_span_processors`), the other processes from `init_tracing`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from core import tracecontext
from core.settings import Settings, get_settings

SERVICE_NAMESPACE = "ray-cluster"
_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.Lock()
_initialised: str | None = None


def span_processors(settings: Settings) -> list[SpanProcessor]:
    if not settings.otel.exporter_otlp_endpoint:
        return []
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    endpoint = settings.otel.exporter_otlp_endpoint.rstrip("/") + "/v1/traces"
    # Batching keeps export off the request path; a dead collector drops spans, never requests.
    return [BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=5), schedule_delay_millis=1000)]


def serve_span_processors() -> list[SpanProcessor]:
    """Ray Serve's tracing exporter hook (`tracing_config.exporter_import_path`)."""
    return span_processors(get_settings())


def init_tracing(service: str, settings: Settings | None = None) -> None:
    """Install this process's tracer provider once; later calls are no-ops."""
    global _initialised
    settings = settings or get_settings()
    with _lock:
        if _initialised is not None:
            return
        resource = Resource.create({"service.name": service, "service.namespace": SERVICE_NAMESPACE})
        processors = span_processors(settings)
        sampler = ParentBased(TraceIdRatioBased(settings.otel.traces_sampler_ratio)) if processors else ALWAYS_OFF
        provider = TracerProvider(resource=resource, sampler=sampler)
        for processor in processors:
            provider.add_span_processor(processor)
        trace.set_tracer_provider(provider)
        _initialised = service


def shutdown_tracing() -> None:
    """Flush spans still in the batch queue (short-lived processes such as training jobs)."""
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def tracer(name: str) -> trace.Tracer:
    return trace.get_tracer(name)


def extract(traceparent: str | None) -> otel_context.Context:
    """A context whose parent is the caller's span, or an empty one for a malformed header."""
    if tracecontext.parse(traceparent) is None:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": str(traceparent)})


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the active span as hex, or None outside any span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextmanager
def span_from(
    name: str,
    traceparent: str | None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span]:
    """A span continuing the trace in `traceparent` (a message header, an environment variable)."""
    with tracer(__name__).start_as_current_span(
        name, context=extract(traceparent), kind=kind, attributes=dict(attributes or {})
    ) as span:
        yield span
