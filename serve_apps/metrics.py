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
