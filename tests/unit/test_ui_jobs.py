"""The training tab: the request it sends and how it shows a job."""

import pytest

from ui.jobs import JOB_COLUMNS, actor_label, is_terminal, job_markdown, job_request, job_rows, parse_overrides


def test_overrides_are_a_json_object_or_nothing():
    assert parse_overrides(None) == {} and parse_overrides("  ") == {}
    assert parse_overrides('{"train.epochs": 5}') == {"train.epochs": 5}
    with pytest.raises(ValueError, match=r"overrides: not valid JSON \(Expecting value at line 1 column 18\)"):
        parse_overrides('{"train.epochs": ')
    with pytest.raises(ValueError, match="must be a JSON object"):
        parse_overrides("[1, 2]")


def test_job_request_leaves_the_default_config_to_the_api():
    assert job_request("tune", "  ", "") == {"kind": "tune", "overrides": {}}
    assert job_request("train", " adult ", '{"train.epochs": 2}') == {
        "kind": "train",
        "overrides": {"train.epochs": 2},
        "config": "adult",
    }


def test_job_markdown_and_rows():
    job = {
        "id": "j1",
        "kind": "train",
        "config": "adult",
        "overrides": {"train.epochs": 2},
        "state": "succeeded",
        "attempts": 1,
        "max_attempts": 3,
        "ray_job_id": "training-j1-1",
        "mlflow_run_id": "run9",
        "model_version": "4",
        "promoted": False,
        "test_metrics": {"accuracy": 0.8512},
        "created_at": "2026-01-02T03:04:05.678+00:00",
        "created_by": {"kind": "operator", "user": "root", "host": "head-1"},
        "events": [{"at": "2026-01-02T03:04:05Z", "state": "queued", "attempt": 0, "message": "a | b\nc"}],
    }
    text = job_markdown(job)
    assert text.startswith("### Job `j1`: **succeeded**")
    assert "Model version **4** (not promoted)" in text and "accuracy 0.8512" in text
    assert "Started by operator root@head-1" in text
    assert "Reason" not in text
    reason = "ModelDataDrift: Drift share 0.67 >= 0.5 on adult-income v3"
    assert f"Reason: {reason}" in job_markdown({**job, "reason": reason})
    assert "| 2026-01-02 03:04:05 | queued | 0 |  | a \\| b c |" in text  # the table survives the message
    assert is_terminal(job) and not is_terminal({**job, "state": "running"})
    (row,) = job_rows([job])
    assert len(row) == len(JOB_COLUMNS)
    assert row[:4] == ["j1", "train", "adult", "succeeded"] and row[6] == "no" and row[7] == "2026-01-02 03:04:05"
    assert row[8] == "operator root@head-1"
    challenger = {**job, "rollout": "canary"}
    assert "rolled out as a canary challenger" in job_markdown(challenger)
    assert job_rows([challenger])[0][6] == "canary"


@pytest.mark.parametrize("state", ["succeeded", "failed", "dead_lettered", "cancelled", "timed_out"])
def test_the_page_stops_following_a_job_that_has_ended(state):
    assert is_terminal({"state": state})


@pytest.mark.parametrize("state", ["queued", "submitted", "running"])
def test_the_page_follows_a_job_that_has_not_ended(state):
    assert not is_terminal({"state": state})


def test_who_did_it():
    assert actor_label({"kind": "api_key", "key_id": "3fa2c1d0e9b8", "name": "ui-1"}) == "key ui-1 (id 3fa2c1d0e9b8)"
    assert actor_label({"kind": "alert", "name": "ModelAccuracyLow"}) == "alert ModelAccuracyLow"
    assert actor_label({"kind": "system"}) == "system"
    # Jobs recorded before actors were: nothing to show.
    assert actor_label(None) == "" and job_markdown({"id": "j0", "state": "queued"}).count("Started by") == 0
