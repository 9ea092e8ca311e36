"""The one line a training or tuning job prints with its outcome, for whoever started it."""

from __future__ import annotations

import json
from typing import Any

RESULT_MARKER = "TRAINING_RESULT "


def result_line(outcome: dict[str, Any]) -> str:
    return RESULT_MARKER + json.dumps(outcome, default=str)


def training_result(logs: str) -> dict[str, Any] | None:
    """The outcome of the last result line in a job's logs, or None when it printed none."""
    for line in reversed(logs.splitlines()):
        if line.startswith(RESULT_MARKER):
            parsed: dict[str, Any] = json.loads(line[len(RESULT_MARKER) :])
            return parsed
    return None
