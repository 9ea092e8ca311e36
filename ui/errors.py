"""API failures as one readable sentence each: what a person at the UI can act on."""

from __future__ import annotations

from typing import Any

import httpx

_STATUS_TEXT = {
    400: "The API rejected the request",
    401: "The API refused the key",
    403: "The API refused access",
    404: "Not found",
    409: "Conflict",
    413: "The request is too large",
    422: "The API rejected the input",
    429: "Too many requests, try again shortly",
    503: "The API is not ready",
}
# Path parts of a validation error's `loc` that name where the field sits, not which field it is.
_LOC_NOISE = {"body", "query", "path", "header", "instances"}


class ApiError(Exception):
    """A failed call, already worded for the UI."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def field_name(loc: list[Any] | None) -> str:
    """`["body", "instances", 0, "age"]` -> `age`; `["body", "overrides", "train.epochs"]` ->
    `overrides.train.epochs`. The row index stays out: the form sends one row."""
    parts = [str(p) for p in loc or [] if not isinstance(p, int) and str(p) not in _LOC_NOISE]
    return ".".join(parts) or "request"


def detail_lines(details: Any) -> list[str]:
    if not isinstance(details, list):
        return []
    lines = []
    for item in details:
        if isinstance(item, dict) and ("loc" in item or "msg" in item):
            lines.append(f"{field_name(item.get('loc'))}: {item.get('msg', 'invalid')}")
    return lines


def _error_body(response: httpx.Response) -> dict[str, Any]:
    """The API's `{"error": {...}}` body; anything else (a proxy's HTML page) as plain text."""
    try:
        body = response.json()
    except ValueError:
        return {"message": response.text.strip()[:200] or response.reason_phrase}
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return body["error"]
    if isinstance(body, dict) and "detail" in body:
        return {"message": str(body["detail"])[:200]}
    return {"message": str(body)[:200]}


def describe_response(response: httpx.Response) -> str:
    """E.g. `The API refused the key (401): invalid API key`, with 422 field details appended."""
    error = _error_body(response)
    status = response.status_code
    head = _STATUS_TEXT.get(status, "The API answered with an error")
    text = f"{head} ({status}): {error.get('message') or response.reason_phrase}"
    details = detail_lines(error.get("details"))
    if details:
        text += " - " + "; ".join(details)
    if error.get("request_id"):
        text += f" [request id {error['request_id']}]"
    return text


def describe_transport_error(exc: httpx.TransportError, service: str, url: str) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{service} at {url} did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"{service} unreachable at {url} (connection refused or no route)"
    return f"{service} at {url} failed: {type(exc).__name__}: {exc}"
