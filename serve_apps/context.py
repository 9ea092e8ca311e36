"""Per-request ids for the ingress: the request id and the trace this request belongs to.

With Serve's tracing on, the replica's span is current and its ids are used; otherwise the
caller's `traceparent` is continued (or a trace started) so that the response header, the job
records and the logs still share one trace id.
"""

from __future__ import annotations

import uuid
from typing import Any

from ray.serve import context as serve_context
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core import telemetry, tracecontext
from core.logs import log_context, remember_trace

REQUEST_ID_HEADER = "X-Request-ID"
TRACE_ID_HEADER = "X-Trace-Id"


def request_id_from(incoming: str | None) -> str:
    # Accept a caller's id only when it is short and printable, so it is safe to log and echo.
    if incoming and 0 < len(incoming) <= 128 and incoming.isprintable():
        return incoming
    # Serve's proxy assigned one and returns it in X-Request-ID; use the same, so the body, the
    # header and Serve's access logs agree.
    return serve_request_id() or uuid.uuid4().hex


def serve_request_id() -> str:
    return serve_context._get_serve_request_context().request_id


def request_traceparent(incoming: str | None) -> str:
    ids = telemetry.current_ids()
    if ids is not None:
        return f"00-{ids[0]}-{ids[1]}-01"
    return tracecontext.child_of(incoming)


class RequestContextMiddleware:
    """Pure ASGI (no extra task per request): sets request.state.request_id and
    request.state.traceparent, adds `traceparent` and `X-Trace-Id` to every response, and puts
    both ids on every log line written while the request runs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, bytes] = dict(scope.get("headers") or [])
        incoming_rid = headers.get(b"x-request-id")
        incoming_tp = headers.get(b"traceparent")
        request_id = request_id_from(incoming_rid.decode("latin-1") if incoming_rid else None)
        traceparent = request_traceparent(incoming_tp.decode("latin-1") if incoming_tp else None)
        trace_id, span_id, _ = traceparent.split("-")[1:]
        remember_trace(request_id, trace_id, span_id)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        state["traceparent"] = traceparent
        extra = [(b"traceparent", traceparent.encode()), (TRACE_ID_HEADER.lower().encode(), trace_id.encode())]

        async def send_with_ids(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        with log_context(request_id=request_id, trace_id=trace_id, span_id=span_id):
            await self.app(scope, receive, send_with_ids)
