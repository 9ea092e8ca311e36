"""What the drift monitor costs, and how fast it notices a shift.

    .venv/bin/python -m benchmarks.monitor_overhead [--connections 16] [--duration 20] [--rounds 3]

Starts its own stack (own ports, state dir, databases), trains a one-epoch Adult model, then:

1. `/v1/predict` throughput with wrk, the stack restarted with the monitor off and on before each
   measurement, alternating; the monitor judges the largest window (`MONITOR_MAX_ROWS`) of the
   predictions wrk itself records, at a short refresh, so each round is its worst case;
2. the monitor's CPU seconds per judged window and wall time per refresh, from its own counters;
3. the time from the first request of shifted traffic (Adult's test rows with eight features moved)
   to `ModelDataDrift` firing in Prometheus, after a calm phase of unshifted rows.

Prints a table and writes benchmarks/results/monitor_overhead.json.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from typing import Any

import httpx
import pandas as pd
import typer

from benchmarks.tracing_overhead import _measure, _ready, predict_load
from cluster.sandbox import hermetic_stack, start, stop
from core.settings import REPO_ROOT, Settings

RESULTS = REPO_ROOT / "benchmarks" / "results"
BATCH = 20
# Short enough to measure in a minute; the shipped defaults are in core/settings.py.
BENCH_MONITOR = {
    "MONITOR_REFRESH_S": "5",
    "MONITOR_MIN_ROWS": "200",
    "MONITOR_MAX_ROWS": "5000",
    "MONITOR_DRIFT_ALERT_FOR_S": "30",
    "PROMETHEUS_SCRAPE_INTERVAL_S": "5",
}
# The alert phase judges a window a few seconds of traffic fill.
ALERT_WINDOW_ROWS = "1000"


def adult_rows() -> list[dict[str, Any]]:
    from jobs.config import load_config
    from jobs.data.loading import load_test_frame

    frame = load_test_frame(load_config(REPO_ROOT / "jobs" / "configs" / "adult.yaml")).drop(columns=["income"])
    records = frame.to_dict("records")
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in records]


def shifted(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Older, longer hours, richer, other jobs: eight of Adult's fourteen features move."""
    frame = pd.DataFrame(rows)
    frame["age"] = frame["age"] + 25
    frame["hours_per_week"] = frame["hours_per_week"] * 1.6
    frame["fnlwgt"] = frame["fnlwgt"] * 3
    frame["capital_gain"] = frame["capital_gain"] + 20_000
    frame["education"] = "Doctorate"
    frame["education_num"] = 16
    frame["occupation"] = "Prof-specialty"
    frame["workclass"] = "Self-emp-inc"
    records = frame.to_dict("records")
    return [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in records]


def _metric(settings: Settings, name: str) -> float:
    """The sum of a metric's samples on the dispatcher's endpoint (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{settings.dispatcher.metrics_port}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#") and line[len(name)] in " {":
            total += float(line.rsplit(" ", 1)[1])
    return total


def _send(client: httpx.Client, url: str, rows: list[dict[str, Any]], seconds: float, per_s: float) -> int:
    """Batches of BATCH rows at `per_s` requests a second for `seconds`; returns requests sent."""
    sent, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        start = (sent * BATCH) % (len(rows) - BATCH)
        response = client.post(url, json={"instances": rows[start : start + BATCH]})
        response.raise_for_status()
        sent += 1
        time.sleep(max(0.0, started + sent / per_s - time.monotonic()))
    return sent


def _firing(settings: Settings, alert: str, model: str) -> bool:
    alerts = httpx.get(f"{settings.prometheus.url}/api/v1/alerts", timeout=10).json()["data"]["alerts"]
    return any(
        a["labels"].get("alertname") == alert and a["labels"].get("model") == model and a["state"] == "firing"
        for a in alerts
    )


def time_to_alert(settings: Settings, key: str, url: str, timeout_s: float = 300) -> dict[str, float]:
    """Calm traffic until the monitor has judged it, then shifted traffic until the alert fires."""
    calm = adult_rows()
    moved = shifted(calm)
    model = settings.model.name
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(headers=headers, timeout=30) as client:
        _send(client, url, calm, seconds=20, per_s=10)
        if _firing(settings, "ModelDataDrift", model):
            raise SystemExit("ModelDataDrift fires on unshifted traffic: the calm phase is not calm")
        shift_started = time.monotonic()
        while not _firing(settings, "ModelDataDrift", model):
            if time.monotonic() - shift_started > timeout_s:
                raise SystemExit(f"ModelDataDrift did not fire within {timeout_s:.0f} s of the shift")
            _send(client, url, moved, seconds=1, per_s=10)
    return {"seconds_to_firing": time.monotonic() - shift_started}


def run(connections: int = 16, duration: int = 20, rounds: int = 3) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    overrides = {**BENCH_MONITOR, "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    with hermetic_stack("bench_monitor", overrides) as stack:
        env, key = stack.env, stack.api_key
        url, script, version = predict_load(stack)
        for _ in range(rounds):
            for monitor in (False, True):
                stop(env)
                start({**env, "MONITOR_ENABLED": str(monitor).lower()})
                _ready(url, key)
                cpu_before = _metric(stack.settings, "model_monitor_cpu_seconds_total")
                windows_before = _metric(stack.settings, "model_monitor_windows_total")
                figures: dict[str, Any] = dict(_measure(url, script, connections, duration))
                figures["monitor"] = monitor
                if monitor:
                    windows = _metric(stack.settings, "model_monitor_windows_total") - windows_before
                    cpu = _metric(stack.settings, "model_monitor_cpu_seconds_total") - cpu_before
                    figures.update(
                        windows_judged=windows,
                        cpu_s_per_window=cpu / windows if windows else None,
                        refresh_s_last=_metric(stack.settings, "model_monitor_refresh_seconds"),
                    )
                runs.append(figures)
                typer.echo(
                    f"monitor {'on ' if monitor else 'off'}: {figures['rps']:.0f} req/s, p99 {figures['p99_ms']:.1f} ms"
                    + (f", {figures['cpu_s_per_window']} CPU s per window" if monitor else "")
                )
        stop(env)
        start({**env, "MONITOR_ENABLED": "true", "MONITOR_MAX_ROWS": ALERT_WINDOW_ROWS})
        _ready(url, key)
        alert = time_to_alert(stack.settings, key, url)
        typer.echo(f"ModelDataDrift fired {alert['seconds_to_firing']:.0f} s after the shift began")
    off = [r["rps"] for r in runs if not r["monitor"]]
    on = [r["rps"] for r in runs if r["monitor"]]
    per_window = [r["cpu_s_per_window"] for r in runs if r["monitor"] and r["cpu_s_per_window"] is not None]
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "model_version": version,
        "connections": connections,
        "duration_s": duration,
        "settings": {**BENCH_MONITOR, "alert_phase_max_rows": ALERT_WINDOW_ROWS},
        "runs": runs,
        "rps_off": {"median": statistics.median(off), "min": min(off), "max": max(off)},
        "rps_on": {"median": statistics.median(on), "min": min(on), "max": max(on)},
        "cost_pct": 100 * (1 - statistics.median(on) / statistics.median(off)),
        "cpu_s_per_window_median": statistics.median(per_window) if per_window else None,
        "alert": alert,
    }


def main(connections: int = 16, duration: int = 20, rounds: int = 3) -> None:
    summary = run(connections, duration, rounds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitor_overhead.json").write_text(json.dumps(summary, indent=2))
    typer.echo(
        f"median req/s: off {summary['rps_off']['median']:.0f} ({summary['rps_off']['min']:.0f}-"
        f"{summary['rps_off']['max']:.0f}), on {summary['rps_on']['median']:.0f} ({summary['rps_on']['min']:.0f}-"
        f"{summary['rps_on']['max']:.0f}): {summary['cost_pct']:.1f}% lower with the monitor on"
    )


if __name__ == "__main__":
    typer.run(main)
