"""Serve's knobs, from the settings into the Serve config that deploys the inference API.

The settings (`SERVE_*`, `MODEL_POLL_INTERVAL_S`, `MAX_BATCH_ROWS`) are the one place they are
set; serve_apps/config.yaml holds the rest of the application's shape. What may change while
replicas run goes into the deployment's `user_config` (applied by `Ingress.reconfigure`);
concurrency and replica bounds are Serve's own deployment options.
"""

from __future__ import annotations

import copy
from typing import Any

from core.settings import ModelSettings, ServeSettings
from serve_apps.replica import ServingKnobs

DEPLOYMENT = "Ingress"


def serving_knobs(serve: ServeSettings, model: ModelSettings, max_rows: int) -> ServingKnobs:
    return ServingKnobs(
        max_batch_size=serve.max_batch_size,
        batch_wait_timeout_s=serve.batch_wait_timeout_s,
        poll_interval_s=model.poll_interval_s,
        max_rows=max_rows,
    )


def with_knobs(config: dict[str, Any], serve: ServeSettings, model: ModelSettings, max_rows: int) -> dict[str, Any]:
    """A copy of the Serve config with the ingress deployment's knobs filled in."""
    rendered = copy.deepcopy(config)
    low = serve.min_replicas
    for app in rendered.get("applications", []):
        for deployment in app.get("deployments", []):
            if deployment.get("name") != DEPLOYMENT:
                continue
            deployment["max_ongoing_requests"] = serve.max_ongoing_requests
            deployment.setdefault("autoscaling_config", {}).update(
                min_replicas=low, initial_replicas=low, max_replicas=max(low, serve.max_replicas)
            )
            deployment["user_config"] = serving_knobs(serve, model, max_rows).model_dump()
    return rendered
