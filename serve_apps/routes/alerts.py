"""Alertmanager's webhook: the closed loop's way from an alert to a retraining job."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from serve_apps.dependencies import ALERT_TOKEN, ReplicaDep
from serve_apps.errors import ALERT_RESPONSES
from serve_apps.schemas import AlertmanagerPayload, AlertWebhookResponse, RetrainRequest
from services.training_jobs.models import JobSpec

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["alerts"], dependencies=[ALERT_TOKEN], responses=ALERT_RESPONSES)


@router.post("/v1/alerts/alertmanager", response_model=AlertWebhookResponse)
async def alert_webhook(payload: AlertmanagerPayload, request: Request, replica: ReplicaDep) -> Any:
    """Alertmanager's webhook: each firing alert labelled `action: retrain` enqueues one
    training job per alert episode (its fingerprint and start time are the idempotency key,
    so Alertmanager's repeats and retries return the same job)."""
    retrain_settings = replica.settings.retrain
    retrain: list[RetrainRequest] = []
    for alert in payload.alerts:
        if alert.status != "firing" or alert.labels.get("action") != "retrain":
            continue
        jobs = await replica.training_jobs()
        name = alert.labels.get("alertname", "alert")
        spec = JobSpec(
            kind=retrain_settings.kind,
            config=retrain_settings.config,
            overrides=retrain_settings.overrides,
            idempotency_key=f"alert:{name}:{alert.fingerprint}:{alert.episode}"[:200],
        )
        # The overrides come from the cluster's own settings (RETRAIN_OVERRIDES): an operator's.
        job, created = await jobs.submit(spec, request.state.traceparent, operator=True)
        replica.metrics.retrain_requests.inc(tags={"created": str(created).lower()})
        log.info(
            "alert %s (%s): retrain job %s %s",
            name,
            alert.fingerprint,
            job.id,
            "queued" if created else "already queued",
            extra={"job_id": str(job.id), "alert": name, "model_version": alert.labels.get("model_version")},
        )
        retrain.append(RetrainRequest(alert=name, fingerprint=alert.fingerprint, job_id=str(job.id), created=created))
    return AlertWebhookResponse(retrain=retrain)
