"""Alertmanager's webhook: the closed loop's way from an alert to a retraining job."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from core.audit import Actor
from serve_apps.dependencies import ALERT_TOKEN, ReplicaDep
from serve_apps.errors import ALERT_RESPONSES
from serve_apps.schemas import Alert, AlertmanagerPayload, AlertWebhookResponse, RetrainRefusal, RetrainRequest
from services.training_jobs.models import JobSpec
from services.training_jobs.retrain import RetrainConfigError, retrain_config

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["alerts"], dependencies=[ALERT_TOKEN], responses=ALERT_RESPONSES)
NO_MODEL_LABEL = "the alert has no 'model' label, so it is unknown which model to retrain"


def _refusal(alert: Alert, model: str | None, reason: str, replica: ReplicaDep) -> RetrainRefusal:
    name = alert.labels.get("alertname", "alert")
    replica.metrics.retrain_refusals.inc(tags={"model": model or ""})
    log.error("alert %s (%s) queued no retraining: %s", name, alert.fingerprint, reason, extra={"alert": name})
    return RetrainRefusal(alert=name, fingerprint=alert.fingerprint, model=model, reason=reason)


async def _retrain(alert: Alert, model: str, config: str, request: Request, replica: ReplicaDep) -> RetrainRequest:
    retrain_settings = replica.settings.retrain
    name = alert.labels.get("alertname", "alert")
    spec = JobSpec(
        kind=retrain_settings.kind,
        config=config,
        overrides=retrain_settings.overrides,
        idempotency_key=f"alert:{name}:{alert.fingerprint}:{alert.episode}"[:200],
    )
    jobs = await replica.training_jobs()
    # The overrides come from the cluster's own settings (RETRAIN_OVERRIDES): an operator's.
    job, created = await jobs.submit(
        spec, request.state.traceparent, actor=Actor(kind="alert", name=name), operator=True
    )
    replica.metrics.retrain_requests.inc(tags={"created": str(created).lower()})
    log.info(
        "alert %s (%s): retrain job %s of %s with config %s %s",
        name,
        alert.fingerprint,
        job.id,
        model,
        config,
        "queued" if created else "already queued",
        extra={"job_id": str(job.id), "alert": name, "model_version": alert.labels.get("model_version")},
    )
    return RetrainRequest(
        alert=name, fingerprint=alert.fingerprint, model=model, config=config, job_id=str(job.id), created=created
    )


@router.post("/v1/alerts/alertmanager", response_model=AlertWebhookResponse)
async def alert_webhook(payload: AlertmanagerPayload, request: Request, replica: ReplicaDep) -> Any:
    """Alertmanager's webhook: each firing alert labelled `action: retrain` enqueues one training
    job of the model its `model` label names, with the config in jobs/configs that trains that model
    (`RETRAIN_CONFIGS` chooses where several do), once per alert episode (its fingerprint and start
    time are the idempotency key, so Alertmanager's repeats and retries return the same job). An
    alert whose model no config can retrain queues nothing and is listed under `refused`."""
    response = AlertWebhookResponse(retrain=[])
    for alert in payload.alerts:
        if alert.status != "firing" or alert.labels.get("action") != "retrain":
            continue
        model = alert.labels.get("model")
        if not model:
            response.refused.append(_refusal(alert, None, NO_MODEL_LABEL, replica))
            continue
        try:
            config = retrain_config(model, replica.settings.retrain.kind, replica.settings.retrain.configs)
        except RetrainConfigError as exc:
            response.refused.append(_refusal(alert, model, str(exc), replica))
            continue
        response.retrain.append(await _retrain(alert, model, config, request, replica))
    return response
