"""Two models served at once against one, in the same run, through the edge.

The second model is a copy of the first under another name (`<name>-twin`, registered with
`MlflowClient.copy_model_version` and given the champion alias): the same network and the same
rows, so any difference in throughput is the cost of serving two models side by side (two batch
groups, two alias pollers), not of a different model. Single-row requests: one model at
`connections`, then both at once with half the connections each (two wrk processes). Also the
ingress replicas' memory before and after the second model loads.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from mlflow.tracking import MlflowClient

from benchmarks.load import LoadResult, run_wrk
from benchmarks.peers import sample_rows
from cluster.edge import bearer_headers, local_edge_url
from cluster.sandbox import replica_pids
from core.health import wait_until
from core.settings import Settings

MIB = 1024 * 1024


def register_twin(settings: Settings, name: str, version: str) -> str:
    """A second registered model, a copy of `name`'s `version`, as its champion."""
    client = MlflowClient(settings.mlflow.tracking_uri)
    twin = f"{name}-twin"
    copied = client.copy_model_version(f"models:/{name}/{version}", twin)
    client.set_registered_model_alias(twin, "champion", str(copied.version))
    return twin


def replicas_rss_mib(settings: Settings) -> float:
    total = 0
    for pid in replica_pids(settings):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def _answers(url: str, body: bytes, headers: dict[str, str], ca_file: Path) -> bool:
    try:
        response = httpx.post(url, content=body, headers=headers, verify=str(ca_file), timeout=30)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def _result(result: LoadResult) -> dict[str, Any]:
    return {
        "req_per_s": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.error_count,
        "requests": result.requests,
        "connections": result.connections,
    }


def run_multi_model(
    settings: Settings, api_key: str, ca_file: Path, name: str, version: str, connections: int, duration_s: float
) -> dict[str, Any]:
    headers = {**bearer_headers(api_key), "Content-Type": "application/json"}
    edge = local_edge_url(settings)
    body = orjson.dumps({"instances": sample_rows(1)})
    first = f"{edge}/v1/models/{name}/predict"
    assert wait_until(lambda: _answers(first, body, headers, ca_file), 60), f"{name} does not answer at {first}"
    rss_one = replicas_rss_mib(settings)
    twin = register_twin(settings, name, version)
    second = f"{edge}/v1/models/{twin}/predict"
    # Every replica loads the twin on its first request for it: enough requests to reach each.
    replicas = max(len(replica_pids(settings)), 1)
    for _ in range(10 * replicas):
        assert wait_until(lambda: _answers(second, body, headers, ca_file), 60), f"{twin} does not answer"
    rss_two = replicas_rss_mib(settings)

    warmup = max(1.0, duration_s / 5)
    run_wrk(first, body, headers, connections, warmup)
    one = run_wrk(first, body, headers, connections, duration_s)
    half = max(connections // 2, 1)
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda url: run_wrk(url, body, headers, half, warmup), (first, second)))
        both = list(pool.map(lambda url: run_wrk(url, body, headers, half, duration_s), (first, second)))
    total = sum(result.rps for result in both)
    return {
        "models": [name, twin],
        "one_model": _result(one),
        "two_models": {"req_per_s": total, name: _result(both[0]), twin: _result(both[1])},
        "two_vs_one": total / one.rps if one.rps else 0.0,
        "replicas": replicas,
        "replicas_rss_mib_one_model": rss_one,
        "replicas_rss_mib_two_models": rss_two,
        "rss_mib_per_extra_model_per_replica": (rss_two - rss_one) / replicas,
    }
