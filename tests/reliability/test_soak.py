"""Minutes of steady load through Nginx at the concurrency the performance benchmark measured as
sustainable (16 kept-alive connections; past it p99 grows and throughput does not): no errors, no
latency or throughput drift, no process whose memory keeps growing, none restarted.

`make test` runs 30 seconds; `make test-reliability` the full ten (`--soak-duration 600`).
Its summary goes into `--reliability-report PATH` (docs/RELIABILITY.md reports it).
"""

from __future__ import annotations

import time

import orjson
import pytest

from benchmarks.load import run_wrk
from cluster.sandbox import Stack
from serve_apps.schemas import EXAMPLE_ROW
from tests.reliability.soak import MemorySampler, SoakSummary, Window

pytestmark = pytest.mark.soak

CONNECTIONS = 16  # the benchmark's sustainable point: past it p99 grows and throughput does not
WINDOWS = 10
# A process's resident memory may grow this much after warm-up (allocator arenas, caches
# filling); a leak at this request rate passes it within minutes.
MAX_GROWTH_MIB = 64.0
# Processes whose memory grows by design under load: Prometheus' head block holds every sample
# of the last hours, and PostgreSQL's backends map more of shared buffers as tables grow.
GROWS_BY_DESIGN = ("prometheus", "postgres")
# What serves a prediction, and what keeps the cluster: none of it may restart under load. A
# HAProxy that Serve reloaded out (its successor names it after `-sf`) drains and exits by design,
# for example after an earlier test changed the replica set; that is not a restart.
MUST_STAY = ("ServeReplica", "ServeController", "ProxyActor", "haproxy", "gcs_server", "raylet", "nginx", "mlflow")


def _window(stack: Stack, seconds: float, started_s: float) -> Window:
    result = run_wrk(
        f"{stack.api_url}/v1/predict",
        orjson.dumps({"instances": [EXAMPLE_ROW]}),
        {"Content-Type": "application/json", **stack.auth},
        connections=CONNECTIONS,
        duration_s=seconds,
    )
    return Window(
        started_s=round(started_s, 1),
        requests=result.requests,
        errors=result.error_count,
        rps=result.rps,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        max_ms=result.max_ms,
    )


def soak(stack: Stack, duration_s: float) -> SoakSummary:
    window_s = duration_s / WINDOWS
    run_wrk(
        f"{stack.api_url}/v1/predict",
        orjson.dumps({"instances": [EXAMPLE_ROW]}),
        {"Content-Type": "application/json", **stack.auth},
        connections=CONNECTIONS,
        duration_s=min(10.0, window_s),
    )  # warm-up: connections, pools, the allocator's first arenas
    memory = MemorySampler(stack.settings)
    memory.sample()
    windows = []
    started = time.monotonic()
    for _ in range(WINDOWS):
        windows.append(_window(stack, window_s, time.monotonic() - started))
        memory.sample()
    return SoakSummary(time.monotonic() - started, CONNECTIONS, windows, memory.processes)


def test_steady_load_has_no_errors_drift_or_leak(stack, trained, request, figures):
    duration_s: float = request.config.getoption("--soak-duration")
    summary = soak(stack, duration_s)
    report = summary.as_dict()
    figures["soak"] = report

    assert summary.requests > 0
    assert summary.error_rate <= 0.001, report["windows"]
    assert report["p99_drift"] <= 2.0, report["p99_ms_by_window"]
    assert report["rps_drift"] >= 0.5, report["rps_by_window"]
    restarted = [p.label for p in summary.processes if p.restarted and any(r in p.label for r in MUST_STAY)]
    assert not restarted, restarted
    leaking = {
        f"{p.label}[{p.pid}]": round(p.growth_mib, 1)
        for p in summary.processes
        if p.growth_mib > MAX_GROWTH_MIB and not any(name in p.label for name in GROWS_BY_DESIGN)
    }
    assert not leaking, leaking
