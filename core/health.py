"""Waiting on readiness: HTTP health checks and predicates polled with exponential backoff."""

from __future__ import annotations

from collections.abc import Callable

import httpx
from tenacity import RetryError, retry, retry_if_result, stop_after_delay, wait_exponential


def check(
    url: str, timeout_s: float = 3.0, headers: dict[str, str] | None = None, verify: bool | str = True
) -> tuple[bool, str]:
    try:
        response = httpx.get(url, timeout=timeout_s, headers=headers, verify=verify)
    except httpx.HTTPError as exc:
        return False, f"unreachable ({type(exc).__name__})"
    if response.status_code == 200:
        return True, "healthy"
    return False, f"HTTP {response.status_code}"


def wait_until(predicate: Callable[[], bool], timeout_s: float, max_wait_s: float = 2.0) -> bool:
    """Poll `predicate` with exponential backoff; True once it holds, False at the deadline."""

    @retry(
        retry=retry_if_result(lambda ok: not ok),
        wait=wait_exponential(multiplier=0.1, max=max_wait_s),
        stop=stop_after_delay(timeout_s),
    )
    def attempt() -> bool:
        return predicate()

    try:
        return attempt()
    except RetryError:
        return False


def wait_healthy(
    url: str,
    timeout_s: float,
    alive: Callable[[], bool] = lambda: True,
    headers: dict[str, str] | None = None,
    verify: bool | str = True,
) -> bool:
    """Wait for an HTTP 200 at `url`; give up early once `alive` says the process died."""

    def ok() -> bool:
        return check(url, headers=headers, verify=verify)[0]

    return wait_until(lambda: (not alive()) or ok(), timeout_s) and ok()
