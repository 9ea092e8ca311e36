"""What a long command shows a person (core/progress.py): numbered steps with elapsed time and
what comes next, a heartbeat, failures with their reason and log, and everything else in a log."""

import io
import re
import subprocess
import sys
import textwrap
import time

import pytest

from core.progress import Progress, clock, duration, reason_of
from core.settings import REPO_ROOT


class Clock:
    """A clock the test moves by hand, so the elapsed times in the lines are exact."""

    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def _progress(steps=("settings", "stack", "train"), **kwargs):
    out, err, now = io.StringIO(), io.StringIO(), Clock()
    progress = Progress(steps, out=out, err=err, heartbeat_s=None, now=now, **kwargs)
    return progress, out, err, now


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0 s"), (3.26, "3.3 s"), (53.4, "53 s"), (302, "5 min 02 s"), (3725, "1 h 02 min")],
)
def test_durations_read_as_a_person_says_them(seconds, text):
    assert duration(seconds) == text


def test_clock_counts_minutes_then_hours():
    assert (clock(7), clock(754), clock(3723)) == ("0:07", "12:34", "1:02:03")


def test_each_step_says_what_starts_then_done_with_seconds_and_what_comes_next():
    progress, out, err, now = _progress()
    with progress.step("settings", "API key and secrets in .env") as step:
        now.t += 0.4
        step.outcome = "asynchronous training on"
    now.t += 20
    with progress.step("stack", "starting each component") as step:
        step.note("mlflow: started at http://127.0.0.1:5000")
        now.t += 61.7
    with progress.step("train"):
        now.t += 5
    assert out.getvalue().splitlines() == [
        "[0:00] 1/3 settings: API key and secrets in .env",
        "[0:00] 1/3 settings: done in 0.4 s: asynchronous training on; next: stack",
        "[0:20] 2/3 stack: starting each component",
        "[0:20]       mlflow: started at http://127.0.0.1:5000",
        "[1:22] 2/3 stack: done in 1 min 02 s; next: train",
        "[1:22] 3/3 train",
        "[1:27] 3/3 train: done in 5.0 s",
    ]
    assert err.getvalue() == ""


def test_a_skipped_step_says_why_and_is_not_named_as_next():
    progress, out, _, _ = _progress(("train", "serve", "predict"))
    progress.skip("serve", "version 3 is not the champion")
    with progress.step("train"):
        pass
    lines = out.getvalue().splitlines()
    assert lines[0] == "[0:00] 2/3 serve: skipped (version 3 is not the champion); next: predict"
    assert lines[-1].endswith("train: done in 0.0 s; next: predict")


def test_a_failed_step_prints_its_reason_and_log_on_the_error_stream(tmp_path):
    progress, out, err, now = _progress()
    log = tmp_path / "demo.log"
    with progress.step("settings", log=log) as step:
        now.t += 3
        step.fail("job raysubmit_1 ended FAILED: ValueError: no column 'age'")
    assert err.getvalue().splitlines() == [
        "[0:03] 1/3 settings: FAILED after 3.0 s: job raysubmit_1 ended FAILED: ValueError: no column 'age'",
        f"[0:03]       full log: {log}",
    ]
    assert "done" not in out.getvalue()


def test_an_exception_fails_the_step_with_its_first_line_and_propagates(tmp_path):
    progress, _, err, _ = _progress()
    with pytest.raises(ConnectionError), progress.step("stack", log=tmp_path / "x.log"):
        raise ConnectionError("refused\nsecond line")
    assert "stack: FAILED after 0.0 s: ConnectionError: refused" in err.getvalue()
    assert "second line" not in err.getvalue() and "full log:" in err.getvalue()


def test_reasons_name_the_exception_unless_it_carries_a_sentence():
    assert reason_of(ValueError("bad")) == "ValueError: bad"
    assert reason_of(RuntimeError("serve: deploy failed")) == "serve: deploy failed"
    assert reason_of(KeyboardInterrupt()) == "interrupted"
    assert reason_of(TimeoutError()) == "TimeoutError"


def test_steps_must_be_planned():
    progress, _, _, _ = _progress()
    with pytest.raises(ValueError, match="not one of the planned steps"), progress.step("deploy"):
        pass
    with pytest.raises(ValueError, match="unique"):
        Progress(["a", "a"])


def test_a_long_step_has_a_heartbeat():
    out = io.StringIO()
    progress = Progress(["train"], out=out, heartbeat_s=0.05)
    with progress.step("train"):
        time.sleep(0.3)
    beats = [line for line in out.getvalue().splitlines() if "train: still running" in line]
    assert len(beats) >= 2, out.getvalue()
    assert out.getvalue().splitlines()[-1].startswith("[0:00] 1/1 train: done in ")


SCRIPT = textwrap.dedent(
    """
    import logging, subprocess, sys, warnings
    from pathlib import Path
    from core.progress import Progress, output_to_log

    with output_to_log(Path(sys.argv[1])) as terminal:
        progress = Progress(["work"], out=terminal.out, err=terminal.err, heartbeat_s=None)
        with progress.step("work", "a step"):
            print("print from the command's libraries")
            sys.stderr.write("a library's stderr line\\n")
            warnings.warn("a PyTorch-like UserWarning")
            logging.getLogger("ray.data").warning("a Ray warning")
            logging.getLogger("mlflow").info("an MLflow info line")
            logging.getLogger("cluster").warning("ui: runs with an admin key")
            logging.getLogger("urllib3").error("a library error")
            subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
    print("after: back on the terminal")
    """
)


def test_output_to_log_keeps_the_terminal_for_the_commands_own_lines(tmp_path):
    log = tmp_path / "logs" / "command.log"
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(log)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    lines = done.stdout.splitlines()
    assert len(lines) == 3, done.stdout
    assert lines[0] == "[0:00] 1/1 work: a step" and lines[2] == "after: back on the terminal"
    assert re.fullmatch(r"\[0:\d\d\] 1/1 work: done in \d+\.\d s", lines[1]), lines[1]
    # The platform's warning and anyone's error stay visible; the rest does not.
    assert done.stderr.splitlines() == ["WARNING cluster: ui: runs with an admin key", "ERROR urllib3: a library error"]
    logged = log.read_text()
    for text in (
        "print from the command's libraries",
        "a library's stderr line",
        "UserWarning: a PyTorch-like UserWarning",
        "child stdout",
        "child stderr",
        "WARNING ray.data: a Ray warning",
    ):
        assert text in logged, text
    assert "after: back" not in logged
