"""Many models on one Serve cluster: the shapes Ray Serve offers, measured side by side in one run.

Four shapes, each with a model copied from the served one under a fresh name for every shape
(the same network and rows, so differences are the shape's):

- `fleet`: what the platform ships (ADR 12): the inference app's replicas serve every model with
  a champion, `/v1/models/{name}/predict`, loaded on first request.
- `applications`: one Serve application per model, rendered into the Serve config next to the
  inference app (the same `build_app`, `args: {model_name: ...}`, its own route prefix and
  replicas), deployed with Serve's REST API the way `serve deploy` does.
- `multiplexed` and `fleet_minimal`: `@serve.multiplexed` against the fleet's look-up, in one
  minimal deployment that differs only there (benchmarks/shapes_app.py).

For each: one model at `connections` single-row connections, then two models on the same
connections, each sending to both in turn (one wrk process either way, so the load generator costs
the same); the replicas' memory before and after the second model; and the seconds from making the
second model servable (its alias set, or its application deployed) to its first answer, measured
while the first model is under load, with that load's errors and p99. All on Serve's own port:
Nginx is the same for every shape.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import yaml
from mlflow.tracking import MlflowClient

from benchmarks.load import run_wrk_split
from benchmarks.multi_model import answers, copy_model, load_figures, one_against_two, rss_mib
from benchmarks.peers import sample_rows
from cluster.apps import SERVE_APP, render_serve_config
from cluster.edge import bearer_headers
from cluster.sandbox import replica_pids
from core.health import wait_until
from core.settings import Settings

APPLICATIONS_PREFIX = "/apps"
MINIMAL = {"multiplexed": "shape-multiplexed", "fleet_minimal": "shape-fleet"}


@dataclass
class Shape:
    """How one shape reaches a model by name, and which replicas hold its models."""

    name: str
    url: Callable[[str], str]
    headers: Callable[[str], dict[str, str]]
    replicas: Callable[[], list[int]]
    # Makes a registered model servable: sets its alias, or deploys its application.
    add: Callable[[str], None]


# Serve's declarative config -----------------------------------------------------------------


def apply_serve_config(settings: Settings, config: dict[str, Any], timeout_s: float = 300) -> None:
    """PUT the whole config, as `serve deploy` does; waits until every application runs."""
    url = f"{settings.ray.dashboard_url}/api/serve/applications/"
    response = httpx.put(url, json=config, headers=settings.ray.auth_headers(), timeout=60)
    response.raise_for_status()
    names = {app["name"] for app in config["applications"]}

    def running() -> bool:
        status = httpx.get(url, headers=settings.ray.auth_headers(), timeout=10).json()
        apps = status.get("applications", {})
        failed = [n for n in names if apps.get(n, {}).get("status") in {"DEPLOY_FAILED", "UNHEALTHY"}]
        if failed:
            raise RuntimeError(f"Serve application(s) {failed} failed: {apps[failed[0]].get('message')}")
        return set(apps) == names and all(apps[n].get("status") == "RUNNING" for n in names)

    if not wait_until(running, timeout_s, max_wait_s=0.1):
        raise RuntimeError(f"Serve applications {sorted(names)} did not reach RUNNING in {timeout_s:.0f} s")


def base_config(settings: Settings) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(render_serve_config(settings).read_text(encoding="utf-8"))
    return loaded


def model_application(base: dict[str, Any], model: str) -> dict[str, Any]:
    """The inference app again, for `model` only: its own name, route prefix and replicas."""
    inference = next(app for app in base["applications"] if app["name"] == SERVE_APP)
    app = copy.deepcopy(inference)
    app.update(name=f"model-{model}", route_prefix=f"{APPLICATIONS_PREFIX}/{model}", args={"model_name": model})
    return app


def minimal_application(settings: Settings, shape: str, default_model: str) -> dict[str, Any]:
    args = {
        "multiplexed": shape == "multiplexed",
        "default_model": default_model,
        "alias": settings.champion_alias,
        "tracking_uri": settings.mlflow.tracking_uri,
        "poll_interval_s": settings.model.poll_interval_s,
        "max_batch_size": settings.serve.max_batch_size,
        "batch_wait_timeout_s": settings.serve.batch_wait_timeout_s,
    }
    return {
        "name": MINIMAL[shape],
        "route_prefix": f"/{MINIMAL[shape]}",
        "import_path": "benchmarks.shapes_app:build",
        "args": args,
        # One replica with the inference replica's CPU share: the look-up is what is compared.
        "deployments": [
            {
                "name": "ShapeModels",
                "num_replicas": 1,
                "max_ongoing_requests": settings.serve.max_ongoing_requests,
                "ray_actor_options": {"num_cpus": 0.5},
            }
        ],
    }


# One shape's measurements -------------------------------------------------------------------


def measure_shape(
    shape: Shape, first: str, second: str, body: bytes, connections: int, duration_s: float, rounds: int
) -> dict[str, Any]:
    assert wait_until(lambda: answers(shape.url(first), body, shape.headers(first)), 120), f"{shape.name}: {first}"
    alone = [(shape.url(first), shape.headers(first))]
    run_wrk_split(alone, body, connections, max(1.0, duration_s / 5))
    rss_one = rss_mib(shape.replicas())

    # The second model made servable while the first is under load.
    window_s = max(duration_s, 20.0)
    with ThreadPoolExecutor(1) as pool:
        under_load = pool.submit(run_wrk_split, alone, body, connections, window_s)
        time.sleep(window_s / 5)  # the load is running before the second model arrives
        started = time.monotonic()
        shape.add(second)
        servable = wait_until(lambda: answers(shape.url(second), body, shape.headers(second)), 300, max_wait_s=0.1)
        servable_s = time.monotonic() - started
        during = under_load.result()
    assert servable, f"{shape.name}: {second} never answered"
    # Every replica loads the second model on its first request for it.
    for _ in range(10 * max(len(shape.replicas()), 1)):
        answers(shape.url(second), body, shape.headers(second))
    rss_two = rss_mib(shape.replicas())

    split = [*alone, (shape.url(second), shape.headers(second))]
    return {
        "models": [first, second],
        **one_against_two(alone, split, body, connections, duration_s, rounds),
        "replicas_rss_mib_one_model": rss_one,
        "replicas_rss_mib_two_models": rss_two,
        "rss_mib_extra_model": rss_two - rss_one,
        "second_model_servable_s": servable_s,
        "first_model_while_second_added": load_figures(during),
    }


def run_shapes(
    settings: Settings, api_key: str, name: str, version: str, connections: int, duration_s: float, rounds: int = 3
) -> dict[str, Any]:
    client = MlflowClient(settings.mlflow.tracking_uri)
    alias = settings.champion_alias
    body = orjson.dumps({"instances": sample_rows(1)})
    auth = {**bearer_headers(api_key), "Content-Type": "application/json"}
    base = base_config(settings)
    serve_url = settings.serve.url
    stamp = time.strftime("%H%M%S")
    results: dict[str, Any] = {"connections": connections, "duration_s": duration_s, "rounds": rounds}

    versions: dict[str, str] = {}

    def register(model: str) -> str:
        versions[model] = copy_model(client, name, version, model)
        return model

    def set_alias(model: str) -> None:
        client.set_registered_model_alias(model, alias, versions[model])

    # The platform's fleet: the second model is registered first, its alias set inside the window.
    fleet_second = register(f"{name}-fleet-{stamp}")
    fleet = Shape(
        "fleet",
        url=lambda m: f"{serve_url}/v1/models/{m}/predict",
        headers=lambda _: auth,
        replicas=lambda: replica_pids(settings),
        add=set_alias,
    )
    results["fleet"] = measure_shape(fleet, name, fleet_second, body, connections, duration_s, rounds)

    # One application per model: the second model's app is deployed inside the window.
    app_second = register(f"{name}-app-{stamp}")
    set_alias(app_second)

    def app_url(model: str) -> str:
        if model == name:
            return f"{serve_url}/v1/models/{model}/predict"
        return f"{serve_url}{APPLICATIONS_PREFIX}/{model}/v1/predict"

    applications = Shape(
        "applications",
        url=app_url,
        headers=lambda _: auth,
        replicas=lambda: replica_pids(settings) + replica_pids(settings, app=f"model-{app_second}"),
        add=lambda model: apply_serve_config(
            settings, {**base, "applications": [*base["applications"], model_application(base, model)]}
        ),
    )
    try:
        results["applications"] = measure_shape(applications, name, app_second, body, connections, duration_s, rounds)
    finally:
        apply_serve_config(settings, base)

    # The look-up alone: @serve.multiplexed against the fleet, in the same minimal deployment.
    minimal = [minimal_application(settings, shape, name) for shape in MINIMAL]
    apply_serve_config(settings, {**base, "applications": [*base["applications"], *minimal]})
    try:
        for shape, app in MINIMAL.items():
            second = register(f"{name}-{shape.replace('_', '-')}-{stamp}")
            minimal_shape = _minimal_shape(settings, shape, app, set_alias)
            results[shape] = measure_shape(minimal_shape, name, second, body, connections, duration_s, rounds)
    finally:
        apply_serve_config(settings, base)
    return results


def _minimal_shape(settings: Settings, shape: str, app: str, add: Callable[[str], None]) -> Shape:
    json_type = {"Content-Type": "application/json"}
    if shape == "multiplexed":
        return Shape(
            shape,
            url=lambda _: f"{settings.serve.url}/{app}/predict",
            headers=lambda m: {**json_type, "serve_multiplexed_model_id": m},
            replicas=lambda: replica_pids(settings, app=app, deployment="ShapeModels"),
            add=add,
        )
    return Shape(
        shape,
        url=lambda m: f"{settings.serve.url}/{app}/{m}",
        headers=lambda _: json_type,
        replicas=lambda: replica_pids(settings, app=app, deployment="ShapeModels"),
        add=add,
    )
