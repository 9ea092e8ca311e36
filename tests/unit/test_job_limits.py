"""Per-key quotas, wall-time limits and the creator handed to the Ray job, without services."""

import asyncio
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

import pytest
from pydantic import ValidationError

from core.audit import Actor
from core.settings import DispatcherSettings, Settings, TrainingQueueSettings
from services.dispatcher.core import Dispatcher, past_wall_time, wall_time_limit_s
from services.dispatcher.ray_jobs import RayJobStatus, job_environment
from services.training_jobs.models import JobDetail, JobEvent, JobState, actor_log_fields
from services.training_jobs.quota import (
    ACTIVE_RETRY_AFTER_S,
    JobQuota,
    active_exceeded,
    hourly_exceeded,
    seconds_until,
)
from services.training_jobs.store import PendingStop

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_quota_defaults_and_bounds_come_from_the_training_settings(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    assert JobQuota.from_settings(Settings().training) == JobQuota(max_active=2, max_per_hour=10)
    monkeypatch.setenv("TRAINING_MAX_ACTIVE_PER_KEY", "5")
    monkeypatch.setenv("TRAINING_MAX_PER_HOUR_PER_KEY", "50")
    assert JobQuota.from_settings(Settings().training) == JobQuota(max_active=5, max_per_hour=50)
    for field in ("max_active_per_key", "max_per_hour_per_key"):
        with pytest.raises(ValidationError):
            TrainingQueueSettings.model_validate({field: 0})


def test_retry_after_rounds_up_and_never_says_now():
    assert seconds_until(NOW + timedelta(seconds=599.2), NOW) == 600
    assert seconds_until(NOW + timedelta(seconds=600), NOW) == 600
    assert seconds_until(NOW + timedelta(milliseconds=10), NOW) == 1
    assert seconds_until(NOW - timedelta(seconds=5), NOW) == 1  # left already: retry in a second, not at once


def test_quota_errors_name_the_limit_and_its_setting():
    hourly = hourly_exceeded(10, NOW + timedelta(minutes=7), NOW)
    assert (hourly.limit, hourly.limit_value, hourly.retry_after_s) == ("hourly", 10, 420)
    assert "TRAINING_MAX_PER_HOUR_PER_KEY" in hourly.message
    active = active_exceeded(2)
    assert (active.limit, active.limit_value, active.retry_after_s) == ("active", 2, ACTIVE_RETRY_AFTER_S)
    assert "TRAINING_MAX_ACTIVE_PER_KEY" in active.message


def test_wall_time_is_per_kind_and_counted_from_the_submission(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    settings = Settings().dispatcher
    assert wall_time_limit_s(settings, "train") == 7200 and wall_time_limit_s(settings, "tune") == 21600
    monkeypatch.setenv("DISPATCHER_MAX_WALL_TIME_TRAIN_S", "30")
    assert wall_time_limit_s(Settings().dispatcher, "train") == 30
    with pytest.raises(ValidationError):
        DispatcherSettings(max_wall_time_tune_s=0)
    submitted = NOW - timedelta(seconds=30)
    assert past_wall_time(submitted, NOW, 30) and not past_wall_time(submitted, NOW, 31)
    assert not past_wall_time(None, NOW, 1)  # not submitted yet


def test_the_creator_reaches_the_ray_job_through_its_settings(monkeypatch):
    creator = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci")
    job_id = uuid4()
    env = job_environment(job_id, "00-" + "a" * 32 + "-" + "b" * 16 + "-01", creator)
    assert env["TRAINING_JOB_ID"] == str(job_id)
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.setenv("AUDIT_ACTOR", env["AUDIT_ACTOR"])
    assert Actor.from_json(Settings().audit_actor) == creator
    assert "AUDIT_ACTOR" not in job_environment(job_id, None, None)  # a job accepted before creators were kept


def test_log_fields_name_the_actor_but_carry_no_secret():
    key = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci")
    assert actor_log_fields(key) == {
        "actor": "key:ci (id 3fa2c1d0e9b8)",
        "actor_kind": "api_key",
        "actor_key_id": "3fa2c1d0e9b8",
    }
    assert actor_log_fields(Actor.system())["actor_key_id"] is None


def test_job_history_shows_who_did_what():
    owner = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci")
    detail = JobDetail.model_validate(
        {
            "id": uuid4(),
            "kind": "train",
            "config": "adult",
            "overrides": {},
            "state": "cancelled",
            "attempts": 1,
            "max_attempts": 3,
            "created_at": NOW,
            "updated_at": NOW,
            "created_by": owner.model_dump(exclude_none=True),
            "events": [
                {"at": NOW, "state": "queued", "attempt": 0, "message": "accepted", "actor": owner.model_dump()},
                {"at": NOW, "state": "submitted", "attempt": 1, "message": "ray job x", "actor": None},
            ],
        }
    )
    assert detail.created_by == owner and detail.state == JobState.CANCELLED and detail.state.terminal
    shown = detail.model_dump(mode="json")
    assert shown["created_by"]["key_id"] == "3fa2c1d0e9b8" and shown["events"][0]["actor"]["name"] == "ci"
    assert JobEvent.model_validate(shown["events"][1]).actor is None


class _FakeRay:
    def __init__(self, status: str | None) -> None:
        self._status = status
        self.stopped: list[str] = []

    async def status(self, submission_id: str) -> RayJobStatus | None:
        return None if self._status is None else RayJobStatus(self._status, "")

    async def stop(self, submission_id: str) -> bool:
        self.stopped.append(submission_id)
        return True


class _FakeStore:
    def __init__(self) -> None:
        self.confirmed: list[str] = []

    async def confirm_stopped(self, job_id: UUID, ray_job_id: str) -> bool:
        self.confirmed.append(ray_job_id)
        return True


@pytest.mark.parametrize(
    ("ray_status", "settled", "stopped", "confirmed"),
    [
        ("RUNNING", False, True, False),  # still running: stop it, look again next round
        ("PENDING", True, True, False),
        ("STOPPED", False, False, True),  # ended: nothing more to do
        ("SUCCEEDED", False, False, True),
        (None, False, False, False),  # unknown to Ray, but a dispatcher may still be about to submit it
        (None, True, False, True),  # unknown long after the cancel: it never will be
    ],
)
def test_the_reaper_stops_what_runs_and_settles_what_never_started(
    monkeypatch, ray_status, settled, stopped, confirmed
):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    monkeypatch.delenv("DATABASE_URL", raising=False)
    ray, store = _FakeRay(ray_status), _FakeStore()
    dispatcher = Dispatcher(Settings(), store, None, ray)  # type: ignore[arg-type]
    asyncio.run(dispatcher._reap(PendingStop(uuid4(), "training-x-1", settled)))
    assert (ray.stopped == ["training-x-1"]) is stopped
    assert (store.confirmed == ["training-x-1"]) is confirmed
