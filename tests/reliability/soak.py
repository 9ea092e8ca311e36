"""The soak's instruments: wrk in consecutive windows (error count, rate and p99 of each), and
the resident memory of every process the stack started, sampled after each window.

A leak shows as growth that keeps going after warm-up; a process that was replaced (a crashed
replica) shows as a pid that disappears, which the soak reports as well.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from cluster.supervisor import managed, read_pid, session_members
from core.settings import Settings

MIB = 1024 * 1024
# What a process of the Ray session is, read from its command line (the actor's name for Serve's).
RAY_ROLES = (
    "ServeReplica:inference:Ingress",
    "ServeController",
    "ProxyActor",
    "haproxy",
    "gcs_server",
    "raylet",
    "dashboard.py",
    "log_monitor",
    "monitor.py",
    "runtime_env",
)


@dataclass
class ProcessMemory:
    """One process's resident memory at each sample; None where it was gone."""

    label: str
    pid: int
    rss_mib: list[float | None] = field(default_factory=list)
    # Set when a newer process took over from this one on purpose (HAProxy's graceful reload
    # starts its successor with `-sf <pid>`, and the old one exits once its connections drain).
    handed_over: bool = False

    @property
    def alive_throughout(self) -> bool:
        return all(v is not None for v in self.rss_mib)

    @property
    def restarted(self) -> bool:
        """Gone before the end without having handed over to a successor: it crashed or was
        killed."""
        return not self.alive_throughout and not self.handed_over

    @property
    def growth_mib(self) -> float:
        """From the first sample after warm-up to the last."""
        values = [v for v in self.rss_mib if v is not None]
        return values[-1] - values[0] if len(values) >= 2 else 0.0


def _role(item: str, process: psutil.Process) -> str:
    cmdline = " ".join(process.cmdline())
    for marker in RAY_ROLES:
        if marker in cmdline or marker == process.name():
            return f"{item}:{marker}"
    return f"{item}:{process.name()}"


def handed_over_pids(cmdline: list[str]) -> set[int]:
    """The pids a HAProxy command line takes over from: every numeric argument after `-sf`."""
    if "-sf" not in cmdline:
        return set()
    pids = set()
    for arg in cmdline[cmdline.index("-sf") + 1 :]:
        if not arg.isdigit():
            break
        pids.add(int(arg))
    return pids


def stack_processes(settings: Settings) -> dict[int, tuple[str, psutil.Process]]:
    """Every process of the stack's managed components (Ray, MLflow, Nginx, the dispatcher, ...),
    each labelled with its component and role."""
    found: dict[int, tuple[str, psutil.Process]] = {}
    for pid_file in sorted((settings.state_dir / "pids").glob("*.pid")):
        leader = read_pid(managed(settings, pid_file.stem))
        if leader is None:
            continue
        for process in session_members(leader):
            try:
                found[process.pid] = (_role(pid_file.stem, process), process)
            except psutil.Error:
                continue
    return found


class MemorySampler:
    """Samples the processes found at the first sample; later newcomers are not leaks of theirs."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._tracked: dict[int, tuple[ProcessMemory, psutil.Process]] = {}

    def sample(self) -> None:
        current = stack_processes(self._settings)
        if not self._tracked:
            for pid, (label, process) in current.items():
                self._tracked[pid] = (ProcessMemory(label, pid), process)
        successors_of = self._handed_over(current)
        for memory, process in self._tracked.values():
            memory.handed_over = memory.handed_over or memory.pid in successors_of
            try:
                memory.rss_mib.append(process.memory_info().rss / MIB)
            except psutil.Error:
                memory.rss_mib.append(None)

    @staticmethod
    def _handed_over(current: dict[int, tuple[str, psutil.Process]]) -> set[int]:
        """Pids that a live process of the stack names as the one it took over from."""
        pids: set[int] = set()
        for _, process in current.values():
            try:
                pids |= handed_over_pids(process.cmdline())
            except psutil.Error:
                continue
        return pids

    @property
    def processes(self) -> list[ProcessMemory]:
        return [memory for memory, _ in self._tracked.values()]


@dataclass(frozen=True)
class Window:
    started_s: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float


def drift(values: list[float]) -> float:
    """The last third's median over the first third's: 1.0 is no drift."""
    third = max(1, len(values) // 3)
    first, last = statistics.median(values[:third]), statistics.median(values[-third:])
    return last / first if first > 0 else 0.0


@dataclass
class SoakSummary:
    duration_s: float
    connections: int
    windows: list[Window]
    processes: list[ProcessMemory]

    @property
    def requests(self) -> int:
        return sum(w.requests for w in self.windows)

    @property
    def errors(self) -> int:
        return sum(w.errors for w in self.windows)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "duration_s": self.duration_s,
            "connections": self.connections,
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": self.error_rate,
            "mean_rps": self.requests / self.duration_s if self.duration_s else 0.0,
            "p99_ms_by_window": [round(w.p99_ms, 2) for w in self.windows],
            "rps_by_window": [round(w.rps, 1) for w in self.windows],
            "p99_drift": drift([w.p99_ms for w in self.windows]),
            "rps_drift": drift([w.rps for w in self.windows]),
            "windows": [asdict(w) for w in self.windows],
            "memory": {
                f"{p.label}[{p.pid}]": {
                    "first_mib": round(next((v for v in p.rss_mib if v is not None), 0.0), 1),
                    "last_mib": round(next((v for v in reversed(p.rss_mib) if v is not None), 0.0), 1),
                    "growth_mib": round(p.growth_mib, 1),
                    "alive_throughout": p.alive_throughout,
                    "handed_over": p.handed_over,
                }
                for p in sorted(self.processes, key=lambda p: p.label)
            },
        }
