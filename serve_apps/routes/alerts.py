"""Alertmanager's webhook: the closed loop's way from an alert to a retraining job."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request

from core.audit import Actor
from core.settings import RetrainSettings
from serve_apps.dependencies import ALERT_TOKEN, ReplicaDep
from serve_apps.errors import ALERT_RESPONSES
from serve_apps.schemas import Alert, AlertmanagerPayload, AlertWebhookResponse, RetrainRefusal, RetrainRequest
from services.training_jobs.models import InvalidJobSpecError, JobSpec, OverrideValue, clean_reason
from services.training_jobs.retrain import RetrainConfigError, retrain_config

log = logging.getLogger("ray.serve")
router = APIRouter(tags=["alerts"], dependencies=[ALERT_TOKEN], responses=ALERT_RESPONSES)
NO_MODEL_LABEL = "the alert has no 'model' label, so it is unknown which model to retrain"
# The model's inputs or its answers moved away from what it was trained on: the labelled feedback
# is the freshest data there is, so with RETRAIN_USE_FEEDBACK the job trains on it too.
FEEDBACK_ALERTS = frozenset({"ModelAccuracyLow", "ModelDataDrift", "ModelEstimatedAccuracyLow"})
# Alerts that fire before any label exists: their jobs wait for labels (RETRAIN_FEEDBACK_WAIT_S).
LABEL_FREE_ALERTS = frozenset({"ModelDataDrift", "ModelEstimatedAccuracyLow"})


def retrain_reason(alert: Alert) -> str:
    """Why the job is queued, as its first event and its `reason` say: the alert's name and its
    summary (the figures that made it fire), else its description, else the model version."""
    name = alert.labels.get("alertname", "alert")
    annotations = alert.annotations
    text = clean_reason(annotations.get("summary") or "") or clean_reason(annotations.get("description") or "")
    if text is None:
        model, version = alert.labels.get("model", "?"), alert.labels.get("model_version", "?")
        text = f"{model} version {version}"
    return clean_reason(f"{name}: {text}") or name


def retrain_overrides(alert: Alert, settings: RetrainSettings) -> dict[str, OverrideValue]:
    """RETRAIN_OVERRIDES, after `feedback.enabled` for the alerts that ask for fresh data when
    RETRAIN_USE_FEEDBACK is on (and `feedback.wait_s` for those that fire before any label); the
    operator's overrides win where both set a key."""
    overrides: dict[str, OverrideValue] = {}
    name = alert.labels.get("alertname")
    if settings.use_feedback and name in FEEDBACK_ALERTS:
        overrides["feedback.enabled"] = True
        if name in LABEL_FREE_ALERTS and settings.feedback_wait_s > 0:
            overrides["feedback.wait_s"] = settings.feedback_wait_s
    overrides.update(settings.overrides)
    return overrides


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
        overrides=retrain_overrides(alert, retrain_settings),
        idempotency_key=f"alert:{name}:{alert.fingerprint}:{alert.episode}"[:200],
        reason=retrain_reason(alert),
    )
    jobs = await replica.training_jobs()
    actor = Actor(kind="alert", name=name)
    joined = await jobs.join_alert_job(spec, actor)
    if joined is not None:
        replica.metrics.retrain_requests.inc(tags={"created": "false"})
        log.info(
            "alert %s (%s): joins retrain job %s of %s, already %s",
            name,
            alert.fingerprint,
            joined.id,
            model,
            joined.state.value,
            extra={"job_id": str(joined.id), "alert": name, "reason": spec.reason},
        )
        return RetrainRequest(
            alert=name, fingerprint=alert.fingerprint, model=model, config=config, job_id=str(joined.id), created=False
        )
    # The overrides come from the cluster's own settings (RETRAIN_OVERRIDES): an operator's.
    job, created = await jobs.submit(spec, request.state.traceparent, actor=actor, operator=True)
    replica.metrics.retrain_requests.inc(tags={"created": str(created).lower()})
    log.info(
        "alert %s (%s): retrain job %s of %s with config %s %s",
        name,
        alert.fingerprint,
        job.id,
        model,
        config,
        "queued" if created else "already queued",
        extra={
            "job_id": str(job.id),
            "alert": name,
            "model_version": alert.labels.get("model_version"),
            "reason": spec.reason,
        },
    )
    return RetrainRequest(
        alert=name, fingerprint=alert.fingerprint, model=model, config=config, job_id=str(job.id), created=created
    )


@router.post("/v1/alerts/alertmanager", response_model=AlertWebhookResponse)
async def alert_webhook(payload: AlertmanagerPayload, request: Request, replica: ReplicaDep) -> Any:
    """Alertmanager's webhook: each firing alert labelled `action: retrain` enqueues one training
    job of the model its `model` label names, with the config in jobs/configs that trains that model
    (`RETRAIN_CONFIGS` chooses where several do), once per alert episode (its fingerprint and start
    time are the idempotency key, so Alertmanager's repeats and retries return the same job); while
    another alert's job for that config is queued or running, the alert joins it instead. The
    job's `reason` (and its first event, `accepted: <reason>`) is the alert's name and summary,
    with the figures that made it fire; jobs of the accuracy and drift alerts train on the
    labelled feedback too while RETRAIN_USE_FEEDBACK is on. An alert whose model no config can
    retrain, or whose job the config refuses, queues nothing and is listed under `refused`."""
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
        try:
            response.retrain.append(await _retrain(alert, model, config, request, replica))
        except InvalidJobSpecError as exc:
            # RETRAIN_OVERRIDES (or feedback.enabled) that the config refuses: this alert queues
            # nothing and says why; the other alerts of the notification still go ahead.
            response.refused.append(_refusal(alert, model, f"the job was refused: {exc.message}", replica))
    return response
