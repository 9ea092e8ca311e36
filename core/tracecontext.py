"""W3C Trace Context (`traceparent`) values, carried from an HTTP request to the dispatcher and
the Ray job it starts, so one trace id ties the whole asynchronous flow together."""

from __future__ import annotations

import re
import secrets

_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")


def parse(value: str | None) -> tuple[str, str, str] | None:
    """(trace id, parent span id, flags) of a valid header, else None."""
    if not value:
        return None
    match = _TRACEPARENT.match(value.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags = match.groups()
    # All-zero ids are invalid by the spec; version ff is forbidden.
    if version == "ff" or trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def new_span_id() -> str:
    return secrets.token_hex(8)


def child_of(incoming: str | None) -> str:
    """A traceparent for a new span: in the caller's trace when it sent one, else a new trace."""
    parsed = parse(incoming)
    if parsed is None:
        return f"00-{secrets.token_hex(16)}-{new_span_id()}-01"
    trace_id, _, flags = parsed
    return f"00-{trace_id}-{new_span_id()}-{flags}"


def trace_id_of(traceparent: str | None) -> str | None:
    parsed = parse(traceparent)
    return parsed[0] if parsed else None
