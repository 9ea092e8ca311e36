"""Where a job's wall time goes: named phases timed on the driver and inside the Ray Train run,
logged to MLflow as `phase_<name>_s` metrics and printed in the job's result line
(`benchmarks/training_job.py` publishes them)."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil


def since_process_start() -> float:
    """Seconds from this process's creation to now: the interpreter's start and the imports, the
    part of a job a timer inside `main` cannot see."""
    return max(0.0, time.time() - psutil.Process().create_time())


@dataclass
class Phases:
    """Durations by phase, in the order they were first timed; a phase timed twice adds up."""

    durations: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.durations[name] = self.durations.get(name, 0.0) + max(0.0, seconds)

    def update(self, durations: Mapping[str, float]) -> None:
        for name, seconds in durations.items():
            self.add(name, seconds)

    def rounded(self) -> dict[str, float]:
        return {name: round(seconds, 4) for name, seconds in self.durations.items()}

    def metrics(self) -> dict[str, float]:
        return {f"phase_{name}_s": seconds for name, seconds in self.rounded().items()}


@dataclass
class WorkerTimings:
    """What rank 0 of a Ray Train run measured, carried in its checkpoint (wall clock, so the
    driver can place it against its own): when the training function started, when its model and
    data were ready, and each epoch's training, MLflow logging and report."""

    loop_started: float
    ready: float
    epoch_s: list[float] = field(default_factory=list)
    logging_s: list[float] = field(default_factory=list)
    report_s: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            "loop_started": self.loop_started,
            "ready": self.ready,
            "epoch_s": list(self.epoch_s),
            "logging_s": list(self.logging_s),
            "report_s": list(self.report_s),
        }

    @classmethod
    def from_dict(cls, saved: Mapping[str, object]) -> WorkerTimings:
        def floats(key: str) -> list[float]:
            value = saved.get(key) or []
            return [float(v) for v in value] if isinstance(value, list) else []

        return cls(
            loop_started=float(saved["loop_started"]),  # type: ignore[arg-type]
            ready=float(saved["ready"]),  # type: ignore[arg-type]
            epoch_s=floats("epoch_s"),
            logging_s=floats("logging_s"),
            report_s=floats("report_s"),
        )


def fit_phases(fit_started: float, fit_ended: float, worker: WorkerTimings | None) -> dict[str, float]:
    """The Ray Train run cut into its phases. Without the worker's figures (a checkpoint of an
    older job) the whole run is one phase. `fit_finish` is what the others leave: the last report
    and checkpoint, the worker group's shutdown and the driver reading the checkpoint back."""
    total = max(0.0, fit_ended - fit_started)
    if worker is None:
        return {"fit": total}
    phases = {
        "fit_worker_start": worker.loop_started - fit_started,
        "fit_worker_setup": worker.ready - worker.loop_started,
        "fit_epochs": sum(worker.epoch_s),
        "fit_epoch_logging": sum(worker.logging_s),
        "fit_reports": sum(worker.report_s),
    }
    phases = {name: max(0.0, seconds) for name, seconds in phases.items()}
    phases["fit_finish"] = max(0.0, total - sum(phases.values()))
    return phases
