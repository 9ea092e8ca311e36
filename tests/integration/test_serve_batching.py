"""`@serve.batch` in the inference deployment joins concurrent requests: Serve's own batch-size
histogram (`serve_actual_batch_size`, recorded by the batching wrapper of `Ingress._predict_batch`
and scraped by the stack's Prometheus) counts batches of more than one request while many clients
send single-row predictions through Nginx at once."""

from __future__ import annotations

import math
import time

from cluster.sandbox import Stack
from tests.reliability.load import SteadyLoad
from tests.serve_probes import INGRESS_SELECTOR, prometheus_query
from tests.stack_probes import until

SELECTOR = f'{INGRESS_SELECTOR},function_name="_predict_batch"'
# Closed-loop clients, one row a request: while the replica runs one batch, the others' requests
# arrive and wait for the next.
CONNECTIONS = 32
REQUESTS = 2000
# A histogram unchanged for this long has every earlier batch in it: Ray's metrics agent reports
# a replica's metrics every 10 s, and Prometheus scrapes it every few seconds after that.
SETTLED_S = 20.0
SETTLE_TIMEOUT_S = 120.0

Histogram = dict[float, float]  # upper bound (le) -> batches of at most that many requests, cumulative


def batch_sizes(stack: Stack) -> Histogram:
    """The deployment's batch-size histogram, summed over its replicas; empty before its first batch."""
    result = prometheus_query(stack, f"sum by (le) (ray_serve_actual_batch_size_bucket{{{SELECTOR}}})")
    return {float(series["metric"]["le"]): float(series["value"][1]) for series in result}


def batches_larger_than_one(histogram: Histogram) -> float:
    return histogram.get(math.inf, 0.0) - histogram.get(1.0, 0.0)


def settled(stack: Stack) -> Histogram:
    """The histogram once it has stopped changing: what earlier requests did, all of it reported."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last, since = batch_sizes(stack), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1)
        current = batch_sizes(stack)
        if current != last:
            last, since = current, time.monotonic()
        elif time.monotonic() - since >= SETTLED_S:
            return current
    raise AssertionError(f"the batch-size histogram kept changing for {SETTLE_TIMEOUT_S}s: {last}")


def test_concurrent_requests_are_batched_together(stack, trained):
    before = settled(stack)
    with SteadyLoad(stack.api_url, stack.auth, stack.verify, rate_per_s=10_000, connections=CONNECTIONS) as load:
        load.wait_for_count(REQUESTS)
    summary = load.summary()
    assert summary.failed == 0, summary.as_dict()

    # Bucket counts only: Ray's metrics agent rebuilds a histogram from them with each bucket's
    # midpoint, so its `_sum` is no count of requests.
    def grown() -> Histogram | None:
        current = batch_sizes(stack)
        return current if batches_larger_than_one(current) > batches_larger_than_one(before) else None

    after = until("batches of more than one request in ray_serve_actual_batch_size", grown, timeout_s=60)
    new = {le: after.get(le, 0.0) - before.get(le, 0.0) for le in sorted(after)}
    assert batches_larger_than_one(after) - batches_larger_than_one(before) >= 1, new
    print(f"{summary.requests} requests; their batches by size, cumulative: {new}")
