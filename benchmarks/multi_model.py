"""Two models served at once against one, in the same run, through the edge.

The second model is a copy of the first under another name (`<name>-twin`, registered with
`MlflowClient.copy_model_version` and given the champion alias): the same network and the same
rows, so any difference in throughput is the cost of serving two models side by side (two batch
groups, two alias pollers), not of a different model. Single-row requests: one model at
`connections`, then both at once on the same connections, each sending to the two in turn. Also the
ingress replicas' memory before and after the second model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil
from mlflow.tracking import MlflowClient

from benchmarks.load import LoadResult, run_wrk_split
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
    client.set_registered_model_alias(twin, settings.champion_alias, copy_model(client, name, version, twin))
    return twin


def copy_model(client: MlflowClient, source: str, version: str, name: str) -> str:
    """A new registered model `name` holding `source`'s `version`; its version, without an alias."""
    return str(client.copy_model_version(f"models:/{source}/{version}", name).version)


def rss_mib(pids: list[int]) -> float:
    """The resident memory of these processes together (those gone meanwhile count nothing)."""
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            continue
    return total / MIB


def answers(url: str, body: bytes, headers: dict[str, str], verify: str | bool = True) -> bool:
    try:
        response = httpx.post(url, content=body, headers=headers, verify=verify, timeout=30)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def load_figures(result: LoadResult) -> dict[str, Any]:
    return {
        "req_per_s": result.rps,
        "p50_ms": result.p50_ms,
        "p99_ms": result.p99_ms,
        "errors": result.error_count,
        "requests": result.requests,
        "connections": result.connections,
    }


def _rounds(results: list[LoadResult]) -> dict[str, Any]:
    """The median round's figures, every round's throughput, and the errors of all rounds."""
    ordered = sorted(results, key=lambda result: result.rps)
    median = ordered[len(ordered) // 2]
    return {
        **load_figures(median),
        "errors": sum(result.error_count for result in results),
        "requests": sum(result.requests for result in results),
        "req_per_s_by_round": [result.rps for result in results],
    }


Targets = list[tuple[str, dict[str, str]]]


def one_against_two(
    alone: Targets, split: Targets, body: bytes, connections: int, duration_s: float, rounds: int
) -> dict[str, Any]:
    """One model, then the same connections split across two, alternated `rounds` times after a
    warm-up of each: a machine whose speed drifts during the run moves both figures alike. The
    ratio is of the medians."""
    warmup = max(1.0, duration_s / 5)
    run_wrk_split(alone, body, connections, warmup)
    run_wrk_split(split, body, connections, warmup)
    ones: list[LoadResult] = []
    twos: list[LoadResult] = []
    for _ in range(rounds):
        ones.append(run_wrk_split(alone, body, connections, duration_s))
        twos.append(run_wrk_split(split, body, connections, duration_s))
    one, two = _rounds(ones), _rounds(twos)
    return {
        "one_model": one,
        "two_models": two,
        "two_vs_one": two["req_per_s"] / one["req_per_s"] if one["req_per_s"] else 0.0,
        "two_vs_one_by_round": [t.rps / o.rps if o.rps else 0.0 for o, t in zip(ones, twos, strict=True)],
    }


def run_multi_model(
    settings: Settings,
    api_key: str,
    ca_file: Path,
    name: str,
    version: str,
    connections: int,
    duration_s: float,
    rounds: int = 3,
) -> dict[str, Any]:
    headers = {**bearer_headers(api_key), "Content-Type": "application/json"}
    edge = local_edge_url(settings)
    body = orjson.dumps({"instances": sample_rows(1)})
    first = f"{edge}/v1/models/{name}/predict"
    assert wait_until(lambda: answers(first, body, headers, str(ca_file)), 60), f"{name} does not answer at {first}"
    rss_one = rss_mib(replica_pids(settings))
    twin = register_twin(settings, name, version)
    second = f"{edge}/v1/models/{twin}/predict"
    # Every replica loads the twin on its first request for it: enough requests to reach each.
    replicas = max(len(replica_pids(settings)), 1)
    for _ in range(10 * replicas):
        assert wait_until(lambda: answers(second, body, headers, str(ca_file)), 60), f"{twin} does not answer"
    rss_two = rss_mib(replica_pids(settings))

    # The same connections, each sending to the two models in turn: an even split, and one wrk
    # process either way, so the load generator takes the same CPU from the server.
    alone = [(first, headers)]
    split = [*alone, (second, headers)]
    return {
        "models": [name, twin],
        **one_against_two(alone, split, body, connections, duration_s, rounds),
        "replicas": replicas,
        "replicas_rss_mib_one_model": rss_one,
        "replicas_rss_mib_two_models": rss_two,
        "rss_mib_per_extra_model_per_replica": (rss_two - rss_one) / replicas,
    }
