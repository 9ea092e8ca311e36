"""Application metrics of the Serve replicas, exported by Ray's metrics agent (names get Ray's
`ray_` prefix; Serve's own request counts and latency histograms come with Serve)."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

ROW_BUCKETS: list[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]


class IngressMetrics:
    def __init__(self) -> None:
        self.request_rows = Histogram(
            "model_request_rows",
            "Rows per prediction request, by model.",
            boundaries=ROW_BUCKETS,
            tag_keys=("route", "model"),
        )
        self.feedback = Counter(
            "feedback_received", "True labels received, by outcome.", tag_keys=("outcome", "model", "model_version")
        )
        self.records_dropped = Counter(
            "prediction_records_dropped", "Prediction rows dropped because PostgreSQL stayed unreachable."
        )
        self.retrain_requests = Counter(
            "retrain_requests", "Training jobs requested by alerts, by whether the job is new.", tag_keys=("created",)
        )
        self.retrain_refusals = Counter(
            "retrain_refusals",
            "Retrain alerts that queued nothing: no config can retrain their model.",
            tag_keys=("model",),
        )


class ModelMetrics:
    def __init__(self) -> None:
        self.predictions = Counter(
            "model_predictions",
            "Predicted rows by model version and class.",
            tag_keys=("model", "model_version", "label"),
        )
        self.serving_version = Gauge(
            "model_serving_version", "The registry version this replica serves.", tag_keys=("model",)
        )
        # Non-zero while the alias names a version this replica refuses to serve (its number; -1 when
        # it is not a number): the ModelSwapRefused alert fires on it.
        self.swap_refused_version = Gauge(
            "model_swap_refused_version",
            "The version the alias names that this replica refuses to serve (0: none).",
            tag_keys=("model",),
        )
        self.swaps_refused = Counter(
            "model_swaps_refused", "Alias moves this replica refused to follow.", tag_keys=("model",)
        )
        self.batch_rows = Histogram(
            "model_batch_rows",
            "Rows per model call (requests joined by @serve.batch), by model.",
            boundaries=ROW_BUCKETS,
            tag_keys=("model",),
        )


class RolloutMetrics:
    """The replica's side of a shadow or canary rollout (the rollout service's own figures are on
    the dispatcher's registry). Counts are kept in plain dicts on the request path and reported
    in bulk by `report`: a Ray counter's `inc` costs more than the routing decision it would count."""

    def __init__(self) -> None:
        self.shadow_requests = Counter(
            "serve_shadow_requests",
            "Requests mirrored to the other version of a rollout, by outcome: scored, dropped (the "
            "replica's mirror queue was full) or failed (the model call raised).",
            tag_keys=("model", "outcome"),
        )
        self.canary_requests = Counter(
            "serve_canary_requests",
            "Requests answered while a canary rollout routes a share of the traffic, by the version that answered.",
            tag_keys=("model", "model_version"),
        )
        self.challenger_version = Gauge(
            "serve_challenger_version",
            "The challenger version this replica has loaded for a shadow or canary rollout (0: none).",
            tag_keys=("model",),
        )
        self.challengers_refused = Counter(
            "serve_challengers_refused",
            "Challengers this replica would not load because they break the champion's serving contract.",
            tag_keys=("model",),
        )
        self._shadow: dict[tuple[str, str], int] = {}
        self._canary: dict[tuple[str, str], int] = {}

    def count_shadow(self, model: str, outcome: str, requests: int = 1) -> None:
        key = (model, outcome)
        self._shadow[key] = self._shadow.get(key, 0) + requests

    def count_canary(self, model: str, version: str) -> None:
        key = (model, version)
        self._canary[key] = self._canary.get(key, 0) + 1

    def report(self) -> None:
        """Hand the counts gathered since the last call to Ray's metrics agent."""
        shadow, self._shadow = self._shadow, {}
        canary, self._canary = self._canary, {}
        for (model, outcome), count in shadow.items():
            self.shadow_requests.inc(count, tags={"model": model, "outcome": outcome})
        for (model, version), count in canary.items():
            self.canary_requests.inc(count, tags={"model": model, "model_version": version})
