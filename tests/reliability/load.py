"""Steady prediction load for fault tests: a fixed request rate over a few kept-alive
connections, every outcome recorded (status, the version that answered, latency), bounded in time
and in count, stopped by the test or by itself. Loopback only: the URL is the test stack's.

    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=100) as load:
        load.wait_for_count(300)
        ...inject the fault...
    summary = load.summary()

It sends no retries of its own: a request the platform failed is counted as failed.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW


@dataclass(frozen=True)
class Outcome:
    sent_at: float  # seconds since the load started
    latency_s: float
    status: int  # 0 when no HTTP response came back
    version: str | None
    error: str | None = None
    request_id: str | None = None  # the id the platform recorded the prediction under
    sequence: int | None = None  # which request of the load this was (its body and headers: `vary`)

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadSummary:
    requests: int
    failed: int
    by_status: dict[str, int]
    versions: dict[str, int]
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: list[str] = field(default_factory=list)

    @property
    def failure_rate(self) -> float:
        return self.failed / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failure_rate": self.failure_rate, "errors": self.errors[:10]}


def summarise(outcomes: list[Outcome]) -> LoadSummary:
    latencies = sorted(o.latency_s * 1000 for o in outcomes) or [0.0]
    p99_index = min(len(latencies) - 1, int(len(latencies) * 0.99))
    failed = [o for o in outcomes if not o.ok]
    return LoadSummary(
        requests=len(outcomes),
        failed=len(failed),
        by_status={str(k): v for k, v in sorted(Counter(o.status for o in outcomes).items())},
        versions={str(k): v for k, v in sorted(Counter(o.version for o in outcomes if o.ok).items())},
        p50_ms=statistics.median(latencies),
        p99_ms=latencies[p99_index],
        max_ms=latencies[-1],
        errors=[f"{o.status} {o.error}" for o in failed],
    )


class SteadyLoad:
    """Each connection sends on its own schedule (rate / connections per second); a request that
    runs late delays only its own connection's next one, so a stalled platform sees no burst."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        verify: bool | str,
        rate_per_s: float = 100.0,
        connections: int = 4,
        max_duration_s: float = 180.0,
        max_requests: int = 50_000,
        body: dict[str, Any] | None = None,
        timeout_s: float = 30.0,
        path: str = "/v1/predict",
        vary: Callable[[int], tuple[dict[str, Any], dict[str, str]]] | None = None,
    ) -> None:
        self._base_url = base_url
        self._headers = headers
        self._verify = verify
        self._interval_s = connections / rate_per_s
        self._connections = connections
        self._max_duration_s = max_duration_s
        self._max_requests = max_requests
        self._body = body or {"instances": [EXAMPLE_ROW]}
        self._timeout_s = timeout_s
        self._path = path
        # The n-th request's body and extra headers, when the load is not one request repeated.
        self._vary = vary
        self._sent = 0
        self._outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="steady-load", daemon=True)
        self._started = 0.0

    def __enter__(self) -> SteadyLoad:
        self._started = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 10)

    @property
    def outcomes(self) -> list[Outcome]:
        with self._lock:
            return list(self._outcomes)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._outcomes)

    def wait_for_count(self, count: int, timeout_s: float = 120.0) -> None:
        """Until `count` requests have been answered in all (or the load ended by its bounds)."""
        assert wait_until(lambda: self.count >= count or not self._thread.is_alive(), timeout_s, max_wait_s=0.1)
        assert self.count >= count, f"the load stopped after {self.count} requests, before {count}"

    def summary(self) -> LoadSummary:
        return summarise(self.outcomes)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        limits = httpx.Limits(max_connections=self._connections, max_keepalive_connections=self._connections)
        async with httpx.AsyncClient(
            base_url=self._base_url,
            headers=self._headers,
            verify=self._verify,
            timeout=self._timeout_s,
            limits=limits,
        ) as client:
            await asyncio.gather(*(self._connection(client, n) for n in range(self._connections)))

    def _within_bounds(self) -> bool:
        elapsed = time.monotonic() - self._started
        return not self._stop.is_set() and elapsed < self._max_duration_s and self.count < self._max_requests

    async def _connection(self, client: httpx.AsyncClient, index: int) -> None:
        next_at = time.monotonic() + index * self._interval_s / self._connections
        while self._within_bounds():
            delay = next_at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_at = max(next_at + self._interval_s, time.monotonic())
            outcome = await self._send(client)
            with self._lock:
                self._outcomes.append(outcome)

    async def _send(self, client: httpx.AsyncClient) -> Outcome:
        sequence = self._sent
        self._sent += 1  # one event loop: no lock needed
        body, headers = self._vary(sequence) if self._vary is not None else (self._body, {})
        sent = time.monotonic()
        try:
            response = await client.post(self._path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            return Outcome(sent - self._started, time.monotonic() - sent, 0, None, repr(exc), sequence=sequence)
        latency = time.monotonic() - sent
        if response.status_code != 200:
            return Outcome(
                sent - self._started, latency, response.status_code, None, response.text[:200], sequence=sequence
            )
        answer = response.json()
        version = str(answer["model"]["version"])
        return Outcome(sent - self._started, latency, 200, version, None, answer["request_id"], sequence)
