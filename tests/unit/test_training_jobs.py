"""Training-job specs, messages, retries and trace context, without services."""

import json
import shlex
import uuid

import pytest
from pydantic import ValidationError

from core import tracecontext
from core.settings import Settings
from services.dispatcher.core import backoff_s
from services.dispatcher.ray_jobs import entrypoint, error_summary
from services.training_jobs.broker import MalformedMessageError, decode, encode
from services.training_jobs.models import InvalidJobSpecError, JobSpec, JobState


def test_spec_defaults_to_the_shipped_config_of_its_kind():
    assert JobSpec().config_path.name == "adult.yaml"
    assert JobSpec(kind="tune").config_name == "adult-tune"
    assert JobSpec().module == "jobs.train" and JobSpec(kind="tune").module == "jobs.tune"


@pytest.mark.parametrize("name", ["../secrets", "Adult", "a/b", "", "x" * 65])
def test_config_names_cannot_escape_the_config_folder(name):
    with pytest.raises(ValidationError):
        JobSpec(config=name)


@pytest.mark.parametrize(
    "spec",
    [
        {"overrides": {"train.lr": float("nan")}},
        {"overrides": {"train.lr": float("inf")}},
        {"overrides": {"data.train_uri": "s3://b/a\x00.csv"}},
        {"overrides": {"model.hidden": [64, {"x": ["\x00"]}]}},
        {"idempotency_key": "retry-\x00"},
    ],
)
def test_values_postgresql_cannot_store_are_refused_up_front(spec):
    """jsonb has no NaN and no NUL character; refused here they are a 422, not a database error."""
    with pytest.raises(ValidationError):
        JobSpec.model_validate(spec)


def test_resolve_names_the_override_at_fault():
    with pytest.raises(InvalidJobSpecError) as info:
        JobSpec(overrides={"train.lr": -1}).resolve()
    assert info.value.loc == ["body", "overrides", "train.lr"]
    assert JobSpec(overrides={"train.epochs": 3}).resolve().train.epochs == 3


@pytest.mark.parametrize(
    "key", ["name", "model_name", "promotion", "promotion.enabled", "promotion.margin", "promotion.metric"]
)
def test_only_an_operator_may_retarget_a_job_or_loosen_its_gate(key):
    values = {"promotion": {"enabled": False}, "promotion.enabled": True, "promotion.margin": -1.0}
    value = values.get(key, "accuracy" if key == "promotion.metric" else "other")
    with pytest.raises(InvalidJobSpecError) as info:
        JobSpec(overrides={key: value}).resolve()
    assert info.value.loc == ["body", "overrides", key]
    assert "only be changed by an operator" in info.value.message
    # The cluster's own settings (the alert webhook's RETRAIN_OVERRIDES) are an operator's.
    assert JobSpec(overrides={key: value}).resolve(operator=True) == JobSpec().resolve().with_overrides({key: value})


def test_anyone_may_turn_promotion_off_but_not_on():
    assert JobSpec(overrides={"promotion.enabled": False}).resolve().promotion.enabled is False
    with pytest.raises(InvalidJobSpecError):
        JobSpec(config="adult", overrides={"promotion.enabled": True}).resolve()


def test_keys_that_only_start_like_operator_settings_stay_open():
    # `train.*` and `data.*` are the user's; only whole path segments count.
    assert JobSpec(overrides={"train.epochs": 2}).resolve().train.epochs == 2
    with pytest.raises(InvalidJobSpecError) as info:
        JobSpec(overrides={"names": "x"}).resolve()
    assert "only be changed by an operator" not in info.value.message


def test_fingerprint_ignores_key_order_and_the_idempotency_key():
    a = JobSpec(overrides={"train.epochs": 3, "train.lr": 0.01}, idempotency_key="k1")
    b = JobSpec(config="adult", overrides={"train.lr": 0.01, "train.epochs": 3}, idempotency_key="k2")
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != JobSpec(overrides={"train.epochs": 4}).fingerprint()


def test_entrypoint_quotes_override_values_for_the_shell():
    spec = JobSpec(overrides={"data.train_uri": "s3://b/it's here.csv", "model.hidden": [64, 32]})
    argv = shlex.split(entrypoint(spec))
    assert argv[:5] == ["python", "-m", "jobs.train", "--config", "jobs/configs/adult.yaml"]
    values = dict(a.split("=", 1) for a in argv[6::2])
    assert json.loads(values["data.train_uri"]) == "s3://b/it's here.csv"
    assert json.loads(values["model.hidden"]) == [64, 32]


def test_messages_round_trip_and_garbage_is_reported():
    job_id = uuid.uuid4()
    assert decode(encode(job_id)) == job_id
    for body in (b"not json", b"{}", b'{"job_id": "nope"}', b"[1]"):
        with pytest.raises(MalformedMessageError):
            decode(body)


def test_backoff_grows_exponentially_and_is_capped():
    delays = [backoff_s(n, base_s=5, max_s=60) for n in (1, 2, 3, 10)]
    assert 4 <= delays[0] <= 6 and 8 <= delays[1] <= 12 and 16 <= delays[2] <= 24
    assert delays[3] <= 72


def test_error_summary_keeps_the_exception_line():
    logs = "starting\nTraceback (most recent call last):\n  File x\nFileNotFoundError: /data.csv\n"
    summary = error_summary(logs, "Job entrypoint command failed with exit code 1")
    assert "FileNotFoundError: /data.csv" in summary and "exit code 1" in summary
    assert error_summary("", "") == "Ray job failed without output"


def test_traceparent_is_continued_or_started():
    incoming = f"00-{'a' * 32}-{'b' * 16}-01"
    child = tracecontext.child_of(incoming)
    assert tracecontext.trace_id_of(child) == "a" * 32 and child != incoming
    fresh = tracecontext.child_of("garbage")
    assert tracecontext.parse(fresh) is not None and tracecontext.trace_id_of(fresh) != "a" * 32
    assert tracecontext.parse(f"00-{'0' * 32}-{'b' * 16}-01") is None


def test_terminal_states():
    assert {s for s in JobState if s.terminal} == {
        JobState.SUCCEEDED,
        JobState.FAILED,
        JobState.DEAD_LETTERED,
        JobState.CANCELLED,
        JobState.TIMED_OUT,
    }


def test_async_training_needs_both_urls_and_blank_means_off(monkeypatch):
    monkeypatch.setitem(Settings.model_config, "env_file", None)
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/jobs")
    monkeypatch.setenv("AMQP_URL", "")
    assert not Settings().training_jobs_enabled
    monkeypatch.setenv("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
    settings = Settings()
    assert settings.training_jobs_enabled and "guest:guest" not in repr(settings)


def test_a_job_refused_by_the_gate_ends_without_retry_and_keeps_its_version():
    from services.dispatcher.core import refusal

    result = {
        "run_id": "r1",
        "model_name": "adult-income",
        "model_version": "9",
        "promotion": {"promote": False, "rule": "incompatible", "reason": "candidate breaks the serving contract"},
    }
    outcome = refusal(result)
    assert outcome is not None and outcome.status == "refused" and outcome.result == result
    assert outcome.error == "promotion refused: candidate breaks the serving contract"
    # A job that crashed before its result line is an ordinary failure, retried.
    assert refusal(None) is None
