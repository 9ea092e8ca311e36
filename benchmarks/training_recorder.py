"""The Ray Train callback of `benchmarks.training`, in a module of its own: it runs in the Train
controller, which would otherwise import the benchmark's (and jobs.train's) heavy dependencies and
start slower than in a real job."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ray.train import UserCallback


class EpochRecorder(UserCallback):
    """Appends every epoch's report to a JSON-lines file. The controller keeps only the
    checkpointed epochs' metrics; its clock gives the epochs' cadence, report included."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        # Workers report the same all-reduced figures; how many reported shows how many trained.
        record = {**metrics[0], "workers": float(len(metrics)), "reported_at": time.time()}
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
