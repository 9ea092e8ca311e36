"""Structured logs: one JSON object per line, with the trace, span and request ids of the work
that wrote it, so a line found in Loki leads to its trace in Tempo and back.

Processes we start call `configure_logging(service)`. Serve replicas keep Serve's own JSON
handler; `TraceContextFilter` adds the same ids to its records. With LOG_DIR set (compose sets it),
every line also goes to `<LOG_DIR>/<service>.log`, where the OpenTelemetry collector tails it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import Any

import orjson

from core import telemetry
from core.settings import get_settings

# Per-request and per-job context that every line written inside it carries.
_context: ContextVar[dict[str, Any] | None] = ContextVar("log_context", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is context.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


# Serve writes its access log line outside the request's own context, naming only the request
# id; this bounded map from request id to trace lets that line carry the request's trace too.
_TRACES: OrderedDict[str, tuple[str, str]] = OrderedDict()
_TRACES_MAX = 10_000
_traces_lock = threading.Lock()


def remember_trace(request_id: str, trace_id: str, span_id: str) -> None:
    with _traces_lock:
        _TRACES[request_id] = (trace_id, span_id)
        if len(_TRACES) > _TRACES_MAX:
            _TRACES.popitem(last=False)


def trace_of_request(request_id: str) -> tuple[str, str] | None:
    with _traces_lock:
        return _TRACES.get(request_id)


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Attach values (request_id, job_id, model_version, ...) to every line logged inside."""
    merged = {**(_context.get() or {}), **{k: v for k, v in values.items() if v is not None}}
    token = _context.set(merged)
    try:
        yield
    finally:
        _context.reset(token)


def context_fields() -> dict[str, Any]:
    fields = dict(_context.get() or {})
    ids = telemetry.current_ids()
    if ids is not None:
        fields.setdefault("trace_id", ids[0])
        fields.setdefault("span_id", ids[1])
    return fields


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record.created),
            "level": record.levelname,
            "service": self._service,
            "logger": record.name,
            "message": record.getMessage(),
            "trace_id": None,
            "span_id": None,
            "request_id": None,
        }
        entry.update(context_fields())
        entry.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TraceContextFilter(logging.Filter):
    """Adds the ids of the active span and the log context to records formatted by someone else."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self._service
        request_id = getattr(record, "request_id", None)
        known = trace_of_request(request_id) if isinstance(request_id, str) else None
        if known is not None:
            record.trace_id, record.span_id = known
        for key, value in context_fields().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


# A log file only carries lines to the collector, which reads them as they are written: a
# bounded size and a couple of rotated files keep a stalled collector from filling the volume.
LOG_FILE_MAX_BYTES = 50 * 1024 * 1024
LOG_FILE_BACKUPS = 2


class SharedRotatingFileHandler(RotatingFileHandler):
    """A size-bounded log file that several processes append to: uvicorn's workers, Ray job
    drivers, scaled containers on one volume. A process whose file another one rotated reopens
    the new file instead of writing on into the rotated copy (as WatchedFileHandler does), so the
    lines stay in the file the collector follows and the file is rotated once, not once per
    writer. Two writers rotating at the same instant at worst shift one backup too many."""

    def __init__(self, filename: str, max_bytes: int = LOG_FILE_MAX_BYTES, backups: int = LOG_FILE_BACKUPS) -> None:
        Path(filename).parent.mkdir(parents=True, exist_ok=True)
        super().__init__(filename, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")

    def emit(self, record: logging.LogRecord) -> None:
        self._reopen_if_rotated()
        super().emit(record)

    def _reopen_if_rotated(self) -> None:
        if self.stream is None:
            return
        try:
            on_disk = os.stat(self.baseFilename)
        except FileNotFoundError:
            on_disk = None
        open_file = os.fstat(self.stream.fileno())
        if on_disk is None or (on_disk.st_dev, on_disk.st_ino) != (open_file.st_dev, open_file.st_ino):
            self.stream.close()
            self.stream = self._open()


def log_file(service: str, log_dir: Path) -> Path:
    """Where a service's lines go: one file per service, which names its Loki stream."""
    return log_dir / f"{service}.log"


def _resolve_log_dir(log_dir: Path | None) -> Path | None:
    return log_dir if log_dir is not None else get_settings().log_dir


def configure_logging(service: str, level: str = "INFO", with_ray: bool = True, log_dir: Path | None = None) -> None:
    """Route the root logger to stderr as JSON lines; `cluster up` sends stderr to a log file.
    With a log directory (`log_dir`, else LOG_DIR) the same lines also go to
    `<dir>/<service>.log` for the collector. `with_ray`: the process uses Ray, whose own logger is
    routed the same way."""
    formatter = JsonFormatter(service)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    directory = _resolve_log_dir(log_dir)
    if directory is not None:
        handlers.append(SharedRotatingFileHandler(str(log_file(service, directory))))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
        # A file of ours from an earlier call; other handlers (a test runner's) are not ours to close.
        if isinstance(existing, SharedRotatingFileHandler):
            existing.close()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    if with_ray:
        _route_ray_logger()
    # Client libraries log every connection attempt at INFO; their warnings are what matters.
    for noisy in ("aiormq", "aio_pika", "httpx", "urllib3", "psycopg.pool"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _route_ray_logger() -> None:
    # Ray gives its logger a plain-text handler when first imported; import it now so that the
    # handler exists to be removed, and Ray's lines go through ours instead.
    import ray  # noqa: F401

    ray_logger = logging.getLogger("ray")
    for existing in list(ray_logger.handlers):
        ray_logger.removeHandler(existing)
    ray_logger.propagate = True


def add_context_filter(logger_name: str, service: str) -> None:
    """Install the filter once on a logger whose handlers belong to someone else (Ray Serve)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(f, TraceContextFilter) for f in logger.filters):
        logger.addFilter(TraceContextFilter(service))


def add_log_file(dict_config_path: Path, service: str, log_dir: Path | None) -> Path:
    """Give a logging dictConfig file (MLflow's uvicorn workers: cluster/mlflow_server.py) the same
    log file as `configure_logging`: every handler list, the root's included, gets it. Unchanged
    without a log directory; returns the path, for the caller to hand on."""
    if log_dir is None:
        return dict_config_path
    config: dict[str, Any] = json.loads(dict_config_path.read_text(encoding="utf-8"))
    config.setdefault("formatters", {})["platform_file"] = {"()": f"{__name__}.JsonFormatter", "service": service}
    config.setdefault("handlers", {})["platform_file"] = {
        "class": f"{__name__}.SharedRotatingFileHandler",
        "filename": str(log_file(service, log_dir)),
        "formatter": "platform_file",
    }
    loggers = [config.setdefault("root", {}), *config.get("loggers", {}).values()]
    for logger in loggers:
        handlers = logger.setdefault("handlers", [])
        if "platform_file" not in handlers:
            handlers.append("platform_file")
    dict_config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return dict_config_path
