"""Why a job was started: the reason a user or an alert gives, how the webhook words an alert's,
and which overrides an alert's job gets."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from pydantic import ValidationError

from core.settings import RetrainSettings
from serve_apps.routes.alerts import retrain_overrides, retrain_reason
from serve_apps.schemas import Alert
from services.training_jobs.models import REASON_MAX_LENGTH, JobRecord, JobSpec, JobState
from services.training_jobs.store import accepted_message


def _alert(name: str = "ModelDataDrift", **annotations: str) -> Alert:
    """A firing alert as Alertmanager's webhook sends it."""
    return Alert.model_validate(
        {
            "status": "firing",
            "labels": {
                "alertname": name, "action": "retrain", "severity": "warning",
                "model": "adult-income", "model_version": "3",
            },
            "annotations": annotations,
            "startsAt": "2026-01-01T10:00:00.123Z",
            "fingerprint": "0f1e2d3c4b5a6978",
        }
    )  # fmt: skip


# Summaries as Prometheus renders the shipped rules (tests/unit/test_alerting_config.py).
DRIFT_SUMMARY = "Drift share 0.67 >= 0.5 on adult-income v3"
ESTIMATE_SUMMARY = "Estimated accuracy 0.812 of adult-income v3 is 0.098 below its reference 0.910 (allowed drop 0.05)"


@pytest.mark.parametrize(
    ("alert", "reason"),
    [
        (_alert(summary=DRIFT_SUMMARY, description="67% of the input features"), f"ModelDataDrift: {DRIFT_SUMMARY}"),
        (
            _alert("ModelEstimatedAccuracyLow", summary=ESTIMATE_SUMMARY),
            f"ModelEstimatedAccuracyLow: {ESTIMATE_SUMMARY}",
        ),
        # No summary: the description carries the figures.
        (_alert(description="Live accuracy 41% is low"), "ModelDataDrift: Live accuracy 41% is low"),
        # Neither (a rule of one's own): at least which version.
        (_alert("MyRetrainRule"), "MyRetrainRule: adult-income version 3"),
        (_alert(summary="  \n "), "ModelDataDrift: adult-income version 3"),
    ],
)  # fmt: skip
def test_the_reason_is_the_alert_s_name_and_figures(alert: Alert, reason: str):
    assert retrain_reason(alert) == reason
    # What the webhook puts on the job is what a user could have sent: it validates as it is.
    assert JobSpec(reason=retrain_reason(alert)).reason == reason


def test_an_annotation_of_several_lines_or_any_length_becomes_one_valid_line():
    folded = retrain_reason(_alert(summary="Drift share 0.67\n\t>= 0.5\x00 on\u202e adult-income v3"))
    assert folded == "ModelDataDrift: Drift share 0.67 >= 0.5 on adult-income v3"
    long = retrain_reason(_alert(summary="drift " * 200))
    assert len(long) == REASON_MAX_LENGTH and long.endswith("\u2026") and long.startswith("ModelDataDrift: ")
    assert JobSpec(reason=long).reason == long


@pytest.mark.parametrize(
    ("alert", "use_feedback", "operator", "expected"),
    [
        # The alerts about the model's inputs or answers train on the labelled feedback too; those
        # that fire before any label wait for labels (RETRAIN_FEEDBACK_WAIT_S)...
        (
            "ModelDataDrift",
            True,
            {"train.epochs": 3},
            {"feedback.enabled": True, "feedback.wait_s": 60.0, "train.epochs": 3},
        ),
        ("ModelEstimatedAccuracyLow", True, {}, {"feedback.enabled": True, "feedback.wait_s": 60.0}),
        ("ModelAccuracyLow", True, {}, {"feedback.enabled": True}),
        # ...unless RETRAIN_USE_FEEDBACK is off, or RETRAIN_OVERRIDES says otherwise (it wins).
        ("ModelDataDrift", False, {"train.epochs": 3}, {"train.epochs": 3}),
        ("ModelAccuracyLow", True, {"feedback.enabled": False}, {"feedback.enabled": False}),
        # An operator's own retrain rule gets the operator's overrides only.
        ("MyRetrainRule", True, {"train.epochs": 3}, {"train.epochs": 3}),
    ],
)
def test_alert_jobs_use_the_feedback_unless_told_not_to(
    alert: str, use_feedback: bool, operator: dict[str, Any], expected: dict[str, Any]
):
    settings = RetrainSettings(use_feedback=use_feedback, overrides=operator, feedback_wait_s=60)
    assert retrain_overrides(_alert(alert), settings) == expected
    assert settings.overrides == operator  # the settings themselves stay as configured


def test_feedback_is_used_by_default_and_label_free_alerts_wait_a_day_for_it():
    assert retrain_overrides(_alert("ModelDataDrift"), RetrainSettings()) == {
        "feedback.enabled": True,
        "feedback.wait_s": 86400.0,
    }
    assert retrain_overrides(_alert("ModelDataDrift"), RetrainSettings(feedback_wait_s=0)) == {"feedback.enabled": True}


def test_a_reason_is_one_stripped_line_of_bounded_length():
    assert JobSpec(reason="  retrain after the March data fix ").reason == "retrain after the March data fix"
    assert JobSpec(reason="   ").reason is None and JobSpec().reason is None
    assert JobSpec(reason="x" * REASON_MAX_LENGTH).reason == "x" * REASON_MAX_LENGTH
    for bad in ["x" * (REASON_MAX_LENGTH + 1), "two\nlines", "tab\there", "nul\x00", "bidi \u202e txet"]:
        with pytest.raises(ValidationError, match="reason"):
            JobSpec(reason=bad)


def test_the_reason_is_not_part_of_the_job_s_identity():
    """Alertmanager repeats an episode with the figures of the moment: the same idempotency key
    with another reason is the same job, not a conflicting reuse."""
    first = JobSpec(config="adult", idempotency_key="k", reason="ModelDataDrift: Drift share 0.67 >= 0.5")
    repeat = JobSpec(config="adult", idempotency_key="k", reason="ModelDataDrift: Drift share 0.71 >= 0.5")
    assert first.fingerprint() == repeat.fingerprint()


def test_the_first_event_says_why_and_the_record_keeps_the_reason():
    assert accepted_message(JobSpec()) == "accepted"
    assert accepted_message(JobSpec(reason=f"ModelDataDrift: {DRIFT_SUMMARY}")) == (
        f"accepted: ModelDataDrift: {DRIFT_SUMMARY}"
    )
    now = datetime.now(UTC)
    record = JobRecord(
        id=uuid4(), kind="train", config="adult", overrides={}, reason="why", state=JobState.QUEUED,
        attempts=0, max_attempts=3, created_at=now, updated_at=now,
    )  # fmt: skip
    assert record.spec().reason == "why"
    assert JobRecord.model_validate({**record.model_dump(), "reason": None}).reason is None
