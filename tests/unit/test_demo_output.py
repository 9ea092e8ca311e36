"""`make demo`'s terminal: its steps and their outcome, the training job's output in a log file,
and a failure's reason with the log that has the rest."""

import io
import re
from pathlib import Path

import pytest

from cluster.demo import DEMO_LOG, JobOutput, data_in_bucket, failure_reason, metrics_line, run_demo, shown, summary
from core.settings import REPO_ROOT, Settings, environment_variables, get_settings

TRACEBACK = """\
2026-01-01 10:00:00,000	INFO worker.py:1 -- Connecting to existing Ray cluster at address: 127.0.0.1:6380...
/work/.venv/lib/python3.11/site-packages/torch/nn/modules/loss.py:1: UserWarning: Using a target size
  warnings.warn(
(TrainController pid=4242) [State Transition] RUNNING -> ERRORED.
Traceback (most recent call last):
  File "/tmp/ray/session/runtime_resources/working_dir_files/jobs/train.py", line 350, in <module>
    cli()
KeyError: "column 'age' is not in the data set"
2026-01-01 10:00:09,000	WARNING some_module.py:3 -- shutting down
"""


def test_a_failed_jobs_reason_is_its_traceback_not_its_last_warning():
    assert failure_reason(TRACEBACK) == "KeyError: \"column 'age' is not in the data set\""


def test_a_ray_workers_error_is_found_behind_its_prefix():
    logs = "(RayTrainWorker pid=77, ip=10.0.0.2) ray.exceptions.RayTaskError(ValueError): bad batch\nbye\n"
    assert failure_reason(logs) == "ray.exceptions.RayTaskError(ValueError): bad batch"


def test_the_promotion_gates_refusal_is_the_reason():
    logs = 'TRAINING_RESULT {"model_version": "2"}\npromotion refused: the champion cannot be scored\n'
    assert failure_reason(logs) == "promotion refused: the champion cannot be scored"


def test_an_error_of_the_jobs_json_logs_is_a_reason_and_else_its_last_line():
    logs = '{"level": "INFO", "message": "loading"}\n{"level": "ERROR", "message": "MLflow not reachable"}\nexit\n'
    assert failure_reason(logs) == "MLflow not reachable"
    assert failure_reason("starting\nKilled\n") == "Killed"
    assert failure_reason("") == "it printed nothing"


# A recorded training job's output (`make demo`, Ray 2.60), shortened: Ray's colour codes, each
# worker's report of every epoch, the warnings that stay in the log.
JOB_OUTPUT = """\
Running entrypoint for job raysubmit_pkRtVZ1cCFPvk4kT: python -m jobs.train --config jobs/configs/adult.yaml
/work/main/.venv/lib/python3.11/site-packages/mlflow/types/utils.py:440: UserWarning: Hint: Inferred schema contains integer column(s).
\x1b[36m(TrainController pid=27966)\x1b[0m Started training worker group of size 2:\x20
\x1b[36m(RayTrainWorker pid=28081)\x1b[0m /work/main/.venv/lib/python3.11/site-packages/ray/train/v2/torch/train_loop_utils.py:249: FutureWarning: `broadcast_buffers` is deprecated.
\x1b[36m(RayTrainWorker pid=28081)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/state/ray_results/ckpt), metrics={'epoch': 0.0, 'train_loss': 0.44027997318067047, 'val_loss': 0.33615286051494775, 'best_val_loss': 0.3})
\x1b[36m(RayTrainWorker pid=28106)\x1b[0m Reporting training result 1: TrainingReport(checkpoint=None, metrics={'epoch': 0.0, 'train_loss': 0.44027997318067047, 'val_loss': 0.33615286051494775, 'best_val_loss': 0.3})
\x1b[36m(RayTrainWorker pid=28081)\x1b[0m Reporting training result 2: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/state/ray_results/ckpt), metrics={'epoch': 1.0, 'train_loss': 0.3368773517901437, 'val_loss': 0.3164487248263722, 'best_val_loss': 0.3})
\x1b[36m(RayTrainWorker pid=28106)\x1b[0m Reporting training result 2: TrainingReport(checkpoint=None, metrics={'epoch': 1.0, 'train_loss': 0.3368773517901437, 'val_loss': 0.3164487248263722, 'best_val_loss': 0.3})
\x1b[36m(RayTrainWorker pid=28081)\x1b[0m Reporting training result 14: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/state/ray_results/ckpt), metrics={'epoch': 13.0, 'train_loss': 0.280415698101646, 'val_loss': 0.29806879814485365, 'best_val_loss': 0.3})
\x1b[36m(RayTrainWorker pid=28106)\x1b[0m Reporting training result 14: TrainingReport(checkpoint=None, metrics={'epoch': 13.0, 'train_loss': 0.280415698101646, 'val_loss': 0.29806879814485365, 'best_val_loss': 0.3})
Created version '1' of model 'adult-income'.
"""  # noqa: E501


def test_the_jobs_output_goes_to_its_log_and_its_milestones_to_the_terminal():
    sink, clock = io.StringIO(), iter([0.0, 1.0, 6.0])
    notes: list[str] = []
    output = JobOutput(sink, notes.append, now=lambda: next(clock))
    # Chunks as the Jobs API streams them: lines split anywhere.
    for start in range(0, len(JOB_OUTPUT), 97):
        output.write(JOB_OUTPUT[start : start + 97])
    assert sink.getvalue() == JOB_OUTPUT
    assert notes == [
        "2 training workers started",
        "epoch 1 done: train loss 0.440, val loss 0.336",
        # epoch 2 came a second later: not worth a line of its own
        "epoch 14 done: train loss 0.280, val loss 0.298",
        "registered adult-income version 1; evaluating and gating it",
    ]


def test_a_ray_workers_coloured_error_is_a_reason():
    logs = "\x1b[36m(RayTrainWorker pid=28081)\x1b[0m ValueError: no rows left after the split\n"
    assert failure_reason(logs) == "ValueError: no rows left after the split"


def test_metrics_read_in_one_line():
    assert metrics_line({"accuracy": 0.86026, "f1": 0.68, "epochs": 5}) == "accuracy 0.860, f1 0.680, epochs 5"


def test_the_summary_says_where_the_logs_are(tmp_path):
    settings = Settings(_env_file=None, state_dir=tmp_path, nginx={"enabled": False}, api={"keys": "k1"})
    text = summary(settings, "k1", tmp_path / "logs" / "demo-train-raysubmit_1.log", 125)
    assert "the demo took 2 min 05 s" in text and "API key       : k1" in text
    assert f"{tmp_path / 'logs'}/ (each component's, and this command's {DEMO_LOG})" in text
    assert f"Training job  : {tmp_path / 'logs' / 'demo-train-raysubmit_1.log'}" in text
    assert "curl -s" in text and "ray" in text and "job submit" in text
    assert f"Artifacts     : {tmp_path / 'mlartifacts'} (MLflow)" in text
    assert f"Checkpoints   : {tmp_path / 'ray_results'} (Ray Train and Tune)" in text


def test_in_s3_mode_the_summary_points_at_the_bucket_and_local_data_is_left_alone_without_it(tmp_path):
    s3 = Settings(_env_file=None, state_dir=tmp_path, nginx={"enabled": False}, s3={"bucket": "platform"})
    text = summary(s3, "k1", None, 5)
    assert "Artifacts     : s3://platform/mlflow (MLflow)" in text
    assert "Checkpoints   : s3://platform/ray-results (Ray Train and Tune)" in text
    # Without a bucket the job reads the config's own paths: nothing to push, no overrides.
    assert data_in_bucket(Settings(_env_file=None, state_dir=tmp_path), "jobs/configs/adult.yaml") == []


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """The platform's settings from this test alone: the demo reads nothing of a developer's
    stack, and writes nothing to the repository's .env."""
    for name, _, _ in environment_variables():
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield tmp_path / "state" / "logs"
    get_settings.cache_clear()


def test_a_demo_that_cannot_start_says_why_and_where_the_log_is_and_nothing_else(isolated, monkeypatch, capfd):
    # Everything the demo would generate is configured, so it writes no .env; PostgreSQL on a
    # closed port fails the dispatcher's preflight before any component starts.
    configured = {
        "API_KEYS": "demo-test-key",
        "ALERT_WEBHOOK_TOKEN": "t1",
        "RAY_AUTH_TOKEN": "t2",
        "MLFLOW_BASIC_AUTH_PASSWORD": "t3",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/demo_test",
        "AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F",
    }
    for name, value in configured.items():
        monkeypatch.setenv(name, value)
    env_file = REPO_ROOT / ".env"
    before = env_file.read_bytes() if env_file.exists() else None

    assert run_demo() == 1
    out, err = capfd.readouterr()
    assert (env_file.read_bytes() if env_file.exists() else None) == before
    lines = out.splitlines()
    assert len(lines) == 3, out
    assert lines[0] == "[0:00] 1/5 settings: API key, secrets and asynchronous training in .env"
    assert re.fullmatch(
        r"\[0:\d\d\] 1/5 settings: done in \d+\.\d s: asynchronous training on \(DATABASE_URL and AMQP_URL are set\); "
        r"next: stack",
        lines[1],
    )
    assert lines[2].endswith(f"2/5 stack: starting each component (their logs: {isolated}/)")
    failed, log_line = err.splitlines()
    assert "2/5 stack: FAILED after" in failed and "dispatcher: PostgreSQL not reachable for DATABASE_URL" in failed
    assert log_line.endswith(f"full log: {isolated}")
    assert (isolated / DEMO_LOG).is_file()


def test_paths_below_the_working_folder_are_shown_relative_and_others_as_they_are(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(shown(tmp_path / ".state" / "logs")) == ".state/logs"
    assert shown(Path("/elsewhere/logs")) == Path("/elsewhere/logs")
