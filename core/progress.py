"""What a long command (`make demo`, `make bench`) shows a person while it runs.

`Progress` prints numbered steps: a line when one starts, a line when it is done with its
seconds and what comes next, a heartbeat while it takes long, and on failure the reason and
where the full log is. Every line starts with the time since the command began.

`output_to_log` sends everything else the process writes (libraries' warnings, Ray's and
PyTorch's chatter, child processes that inherit stdout/stderr) to a log file, and hands back the
terminal for the command's own lines. Errors logged by anyone, and warnings of the platform's own
loggers, still reach the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

# Loggers whose warnings a person running the command should see (the platform's own packages).
PLATFORM_LOGGERS = ("benchmarks", "cluster", "core", "jobs", "serve_apps", "services", "ui")


def duration(seconds: float) -> str:
    """`0.4 s`, `53 s`, `5 min 02 s`, `1 h 05 min`."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def clock(seconds: float) -> str:
    """Elapsed time as on a stopwatch: `0:07`, `12:34`, `1:02:03`."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def reason_of(exc: BaseException) -> str:
    """One line for a person: a RuntimeError (StartupError, typer's Exit) carries a sentence;
    other exceptions are named, since their message alone may not say what broke."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, RuntimeError):
        return line or type(exc).__name__
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


@dataclass
class Step:
    """One running step: what it has to say while it runs, and how it ended."""

    progress: Progress
    name: str
    started: float
    log: Path | None = None
    outcome: str = ""  # shown after "done in N s: "
    failed: bool = False

    def note(self, text: str) -> None:
        """A detail line under the step (indented, so the steps stand out)."""
        self.progress.note(text)

    def fail(self, reason: str, log: Path | None = None) -> None:
        """End the step as failed: the reason and where the full log is, on the error stream."""
        if self.failed:
            return
        self.failed = True
        self.progress.failed(self, reason, log or self.log)


@dataclass
class Progress:
    """Numbered steps of a plan known up front (`steps`: their short names, in order)."""

    steps: Sequence[str]
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO | None = None  # failures; defaults to `out`
    heartbeat_s: float | None = 30.0  # a "still running" line this often while a step runs
    now: Callable[[], float] = time.monotonic
    began: float = field(init=False)
    _done: set[str] = field(init=False, default_factory=set)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if len(set(self.steps)) != len(self.steps):
            raise ValueError(f"step names must be unique: {list(self.steps)}")
        self.began = self.now()

    @property
    def elapsed(self) -> float:
        return self.now() - self.began

    def _emit(self, text: str, stream: TextIO | None = None) -> None:
        target = stream or self.out
        with self._lock:
            for line in text.splitlines() or [""]:
                target.write(f"[{clock(self.elapsed)}] {line}\n")
            target.flush()

    def _label(self, name: str) -> str:
        if name not in self.steps:
            raise ValueError(f"{name!r} is not one of the planned steps {list(self.steps)}")
        return f"{self.steps.index(name) + 1}/{len(self.steps)} {name}"

    def _next(self, name: str) -> str:
        after = [s for s in self.steps[self.steps.index(name) + 1 :] if s not in self._done]
        return f"; next: {after[0]}" if after else ""

    def note(self, text: str) -> None:
        self._emit("\n".join(f"      {line}" for line in text.splitlines()))

    def skip(self, name: str, reason: str) -> None:
        label = self._label(name)
        self._done.add(name)
        self._emit(f"{label}: skipped ({reason}){self._next(name)}")

    @contextlib.contextmanager
    def step(self, name: str, what: str = "", log: Path | None = None) -> Iterator[Step]:
        """Run one step: its start line, its heartbeat, then its done or FAILED line. An exception
        fails the step with its first line and propagates."""
        label = self._label(name)
        current = Step(self, name, self.now(), log)
        self._emit(f"{label}: {what}" if what else label)
        stop = threading.Event()
        beat = self._heartbeat(current, stop) if self.heartbeat_s else None
        try:
            yield current
        except BaseException as exc:
            current.fail(reason_of(exc))
            raise
        finally:
            stop.set()
            if beat is not None:
                beat.join()
            self._done.add(name)
        if not current.failed:
            took = duration(self.now() - current.started)
            outcome = f": {current.outcome}" if current.outcome else ""
            self._emit(f"{label}: done in {took}{outcome}{self._next(name)}")

    def failed(self, step: Step, reason: str, log: Path | None) -> None:
        took = duration(self.now() - step.started)
        text = f"{self._label(step.name)}: FAILED after {took}: {reason}"
        if log is not None:
            text += f"\n      full log: {log}"
        self._emit(text, self.err)

    def _heartbeat(self, step: Step, stop: threading.Event) -> threading.Thread:
        assert self.heartbeat_s is not None

        def beat() -> None:
            while not stop.wait(self.heartbeat_s):
                if not step.failed:
                    self.note(f"{step.name}: still running, {duration(self.now() - step.started)} so far")

        thread = threading.Thread(target=beat, name=f"progress-{step.name}", daemon=True)
        thread.start()
        return thread


# Output --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Terminal:
    """Where the command's own lines go while the process's stdout and stderr go to a log."""

    out: TextIO
    err: TextIO
    log: Path


class _TerminalFilter(logging.Filter):
    """Errors from anyone; warnings from the platform's own loggers."""

    def __init__(self, platform_loggers: Sequence[str]) -> None:
        super().__init__()
        self._platform = tuple(platform_loggers)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        own = record.name.split(".", 1)[0] in self._platform
        return own and record.levelno >= logging.WARNING


def _terminal_stream(fd: int) -> TextIO:
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", errors="replace")


@contextlib.contextmanager
def output_to_log(log_file: Path, platform_loggers: Sequence[str] = PLATFORM_LOGGERS) -> Iterator[Terminal]:
    """For the duration, stdout and stderr (the file descriptors, so C extensions and child
    processes that inherit them too) go to `log_file`, which is started anew; yields the terminal.

    Log records of any logger reach the log; errors, and the platform's own warnings, are also
    shown on the terminal's error stream, one line each.
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    terminal = Terminal(_terminal_stream(1), _terminal_stream(2), log_file)
    to_log = logging.StreamHandler(sys.stderr)  # fd 2, the log, once redirected
    to_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shown = logging.StreamHandler(terminal.err)
    shown.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    shown.addFilter(_TerminalFilter(platform_loggers))
    root = logging.getLogger()
    with log_file.open("wb") as log:
        try:
            for fd in (1, 2):
                os.dup2(log.fileno(), fd)
            root.addHandler(to_log)
            root.addHandler(shown)
            yield terminal
        finally:
            root.removeHandler(to_log)
            root.removeHandler(shown)
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
            terminal.out.close()
            terminal.err.close()
