"""Serve's autoscaling of the inference deployment: under sustained load through Nginx the
platform's own app goes from one replica to two, and back to one once the load is over.

The session stack's deployment autoscales between SERVE_MIN_REPLICAS and SERVE_MAX_REPLICAS with
the shipped delays, which are minutes long by design (serve_apps/config.yaml). The test redeploys
the same application from a copy of the shipped Serve config whose autoscaling reacts within
seconds (Serve applies an autoscaling change in place, without restarting the replica), and
redeploys the shipped config afterwards.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from cluster.apps import deploy_serve
from cluster.sandbox import Stack
from cluster.supervisor import child_environment
from core.health import wait_until
from serve_apps.schemas import EXAMPLE_ROW
from serve_apps.serve_config import DEPLOYMENT
from tests.reliability.load import SteadyLoad
from tests.serve_probes import INGRESS_SELECTOR, ingress_details, prometheus_scalar, replica_states
from tests.stack_probes import until

# Decisions within seconds: replicas report their ongoing requests twice a second (the
# `metrics_interval_s` Serve still reads as the push interval), averaged over two seconds, and one
# replica's worth of ongoing requests is already too many.
FAST_AUTOSCALING: dict[str, Any] = {
    "target_ongoing_requests": 1,
    "metrics_interval_s": 0.5,
    "look_back_period_s": 2,
    "upscale_delay_s": 1,
    # Long enough that a moment in which this process's clients fall behind (two cores run the
    # load, Nginx, HAProxy and both replicas) does not take the second replica away mid-load.
    "downscale_delay_s": 10,
}
# Closed-loop clients: each sends its next request as soon as the previous one is answered, so the
# replica always has several in hand. Ten rows a request keep the work in the replica rather than
# in this process's HTTP client.
CONNECTIONS = 16
ROWS_PER_REQUEST = 10
# A second replica starts, loads the champion from MLflow and joins the ingress within this.
SCALE_OUT_TIMEOUT_S = 90
# Requests answered after the scale-out, while both replicas serve, before the load stops.
REQUESTS_ON_TWO = 300
# After the downscale delay the scaled-in replica drains for Serve's direct-ingress minimum (30 s)
# before it is gone.
SCALE_IN_TIMEOUT_S = 90
GONE_TIMEOUT_S = 120


def fast_config(shipped: Path, target: Path) -> Path:
    """The shipped Serve config with the ingress deployment's autoscaling turned to test speed."""
    config = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    for app in config["applications"]:
        for deployment in app["deployments"]:
            if deployment["name"] == DEPLOYMENT:
                deployment.setdefault("autoscaling_config", {}).update(FAST_AUTOSCALING)
    target.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return target


def redeploy(stack: Stack, config_path: Path, max_replicas: int = 2) -> None:
    """`cluster deploy-serve` from `config_path`, with between one and `max_replicas` replicas."""
    serve = stack.settings.serve.model_copy(
        update={"config_path": config_path, "min_replicas": 1, "max_replicas": max_replicas}
    )
    settings = stack.settings.model_copy(update={"serve": serve})
    deploy_serve(settings, child_environment(settings))


def restore(stack: Stack) -> None:
    """The session's own Serve config and bounds, as `cluster up` deployed them."""
    deploy_serve(stack.settings, child_environment(stack.settings))
    shipped = yaml.safe_load(stack.settings.serve.config_path.read_text(encoding="utf-8"))
    ingress = next(d for a in shipped["applications"] for d in a["deployments"] if d["name"] == DEPLOYMENT)
    assert wait_until(lambda: applied(stack, ingress["autoscaling_config"]), 60), ingress_details(stack)


def applied(stack: Stack, autoscaling: dict[str, Any]) -> bool:
    """The controller runs the deployment with these autoscaling values."""
    current = ingress_details(stack)["deployment_config"].get("autoscaling_config") or {}
    return all(current.get(key) == value for key, value in autoscaling.items())


def one_replica(stack: Stack) -> bool:
    """One replica left in all: none starting, none draining."""
    details = ingress_details(stack)
    return details["target_num_replicas"] == 1 and replica_states(details) == {"RUNNING": 1}


def running(stack: Stack) -> int:
    return replica_states(ingress_details(stack)).get("RUNNING", 0)


def target(stack: Stack) -> int:
    """The replica count the autoscaler has decided on."""
    return int(ingress_details(stack)["target_num_replicas"])


@pytest.fixture
def fast_autoscaling(stack: Stack, trained: dict[str, Any], tmp_path: Path) -> Iterator[None]:
    assert wait_until(lambda: one_replica(stack), GONE_TIMEOUT_S), ingress_details(stack)["replicas"]
    config = fast_config(stack.settings.serve.config_path, tmp_path / "serve_config.yaml")
    try:
        redeploy(stack, config)
        assert wait_until(lambda: applied(stack, FAST_AUTOSCALING), 60), ingress_details(stack)["deployment_config"]
        yield
    finally:
        # Down to one replica now rather than after the shipped downscale delay, then the session's
        # config: later tests count on the single replica they started with.
        if not one_replica(stack):
            redeploy(stack, config, max_replicas=1)
            assert wait_until(lambda: one_replica(stack), GONE_TIMEOUT_S), ingress_details(stack)["replicas"]
        restore(stack)


def exported_target(stack: Stack) -> float | None:
    """The autoscaler's target as Serve exports it, as the stack's Prometheus last scraped it."""
    return prometheus_scalar(stack, f"max(ray_serve_autoscaling_target_replicas{{{INGRESS_SELECTOR}}})")


def test_ingress_scales_out_under_sustained_load_and_back_in_after_it(stack, fast_autoscaling):
    assert one_replica(stack), ingress_details(stack)["replicas"]
    body = {"instances": [EXAMPLE_ROW] * ROWS_PER_REQUEST}
    started = time.monotonic()
    with SteadyLoad(
        stack.api_url,
        stack.auth,
        stack.verify,
        rate_per_s=10_000,  # no pacing: each connection is a closed loop
        connections=CONNECTIONS,
        max_duration_s=2 * SCALE_OUT_TIMEOUT_S + 60,
        body=body,
    ) as load:
        # The autoscaler's decision first, then the second replica up and serving.
        decided = wait_until(lambda: target(stack) == 2, SCALE_OUT_TIMEOUT_S, max_wait_s=0.5)
        decided_after_s = time.monotonic() - started
        scaled_out = decided and wait_until(lambda: running(stack) == 2, SCALE_OUT_TIMEOUT_S, max_wait_s=0.5)
        scaled_out_after_s = time.monotonic() - started
        at_peak = ingress_details(stack)
        exported_peak = False
        if scaled_out:
            load.wait_for_count(load.count + REQUESTS_ON_TWO)
            # The same decision in Serve's own metrics, scraped by the stack's Prometheus: Serve
            # exports the target at its own interval, so the load holds it at two until it is seen.
            exported_peak = wait_until(lambda: (exported_target(stack) or 0) >= 2, 60, max_wait_s=1)
    summary = load.summary()
    load_ended = time.monotonic()
    assert decided, f"no decision to scale out after {SCALE_OUT_TIMEOUT_S}s of load: {summary.as_dict()}"
    assert scaled_out, f"still {replica_states(at_peak)} {SCALE_OUT_TIMEOUT_S}s after the decision: {summary.as_dict()}"
    assert at_peak["target_num_replicas"] == 2, at_peak["replicas"]
    # Scaling out under load fails no request: the new replica joins the ingress once it is ready.
    assert summary.failed == 0, summary.as_dict()

    scaled_in = wait_until(lambda: target(stack) == 1 and running(stack) == 1, SCALE_IN_TIMEOUT_S)
    scaled_in_after_s = time.monotonic() - load_ended
    assert scaled_in, ingress_details(stack)["replicas"]

    assert exported_peak, "a target of two replicas in ray_serve_autoscaling_target_replicas: not seen under load"
    assert until("a target of one replica again", lambda: exported_target(stack) == 1, timeout_s=60)
    print(
        f"decided to scale out after {decided_after_s:.1f}s of load, two replicas running after "
        f"{scaled_out_after_s:.1f}s, back to one {scaled_in_after_s:.1f}s after the load"
    )
