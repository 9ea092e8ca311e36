"""API failures as one readable sentence each: what a person at the UI can act on."""

from __future__ import annotations

import re
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
    429: "Too many requests",
    503: "The API is not ready",
}
# Where the API's error code says more than its status does.
_CODE_TEXT = {
    "job_finished": "The job has already ended",
    "job_limit_exceeded": "Job limit reached",
}
# Path parts of a validation error's `loc` that name where the field sits, not which field it is.
_LOC_NOISE = {"body", "query", "path", "header", "instances"}
MISSING_SCOPE = "missing_scope"
# Where a detail has no `ctx`: "this API key (name) lacks the 'train' scope; ...".
_SCOPE_IN_MESSAGE = re.compile(r"'(?P<scope>[a-z_]+)' scope")
# What the UI's calls need (see InferenceApi), so the scopes `cluster up` gives the UI's own key.
UI_SCOPES = ("predict", "feedback", "train")


class ApiError(Exception):
    """A failed call, already worded for the UI. `code` is the API's error code, when it sent one."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code

    @property
    def missing_scope(self) -> bool:
        return self.code == MISSING_SCOPE


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


def error_body(response: httpx.Response) -> dict[str, Any]:
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


def error_code(response: httpx.Response) -> str | None:
    code = error_body(response).get("code")
    return str(code) if code else None


def retry_after(response: httpx.Response) -> str | None:
    """`Retry-After` as people read it: `30 s`, or the HTTP date the API named. Only 429 and 503
    carry one that matters to a person; elsewhere it is ignored."""
    value = response.headers.get("Retry-After", "").strip()
    if not value or response.status_code not in {429, 503}:
        return None
    return f"{value} s" if value.isdigit() else value


def missing_scope_message(scope: str | None, blocked: str) -> str:
    """Why a part of the page does not work with this key, and who can change that. The UI's
    own key never holds admin, so an admin-only action points at an admin key instead."""
    lacks = f"the '{scope}' scope" if scope else "a scope this needs"
    head = f"This UI's API key lacks {lacks}, so {blocked}"
    if scope == "admin":
        return f"{head}; that takes an admin key, which the UI is never given: use the API with one."
    return (
        f"{head}; an operator can grant it with `python -m cluster keys add <name> --scopes {','.join(UI_SCOPES)}` "
        "and set UI_API_KEY to the new key (or leave UI_API_KEY unset: `cluster up` then registers "
        "a key with these scopes for the UI)."
    )


def _scope_named(error: dict[str, Any], message: str) -> str | None:
    """The scope a 403 names: in a detail's `ctx`, else in the message."""
    for item in error.get("details") or []:
        ctx = item.get("ctx") if isinstance(item, dict) else None
        if isinstance(ctx, dict) and ctx.get("scope"):
            return str(ctx["scope"])
    named = _SCOPE_IN_MESSAGE.search(message)
    return named.group("scope") if named else None


def describe_response(response: httpx.Response, scope: str | None = None, blocked: str | None = None) -> str:
    """E.g. `The API refused the key (401): invalid API key`, with 422 field details appended.
    A 403 for a missing scope says which scope and what it blocks here instead: `blocked` is what
    the call was for, `scope` the one it needs, should the API's message not name it."""
    error = error_body(response)
    status = response.status_code
    message = str(error.get("message") or response.reason_phrase)
    request_id = f" [request id {error['request_id']}]" if error.get("request_id") else ""
    if status == 403 and error.get("code") == MISSING_SCOPE:
        lacking = _scope_named(error, message) or scope
        return missing_scope_message(lacking, blocked or "this part of the page does not work") + request_id
    head = _CODE_TEXT.get(str(error.get("code")), _STATUS_TEXT.get(status, "The API answered with an error"))
    text = f"{head} ({status}): {message}"
    details = detail_lines(error.get("details"))
    if details:
        text += " - " + "; ".join(details)
    wait = retry_after(response)
    if wait is not None:
        text += f"; try again in {wait}" if wait.endswith(" s") else f"; try again after {wait}"
    elif status == 429:
        text += "; try again shortly"
    return text + request_id


def describe_transport_error(exc: httpx.TransportError, service: str, url: str) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"{service} at {url} did not answer in time ({type(exc).__name__})"
    if isinstance(exc, httpx.ConnectError):
        return f"{service} unreachable at {url} (connection refused or no route)"
    return f"{service} at {url} failed: {type(exc).__name__}: {exc}"
