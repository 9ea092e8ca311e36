"""What starting any component of the local stack shares: the one-line error, free ports, the
start-and-wait of a long-running process."""

from __future__ import annotations

import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from cluster.supervisor import log_tail, managed, read_pid, spawn, stop
from core.health import check, wait_healthy
from core.settings import Settings


class StartupError(RuntimeError):
    """One line: what failed and how to fix it."""


def venv_bin(name: str) -> str:
    """A console script of this interpreter's environment, found without relying on PATH."""
    return str(Path(sys.executable).parent / name)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def require_free(host: str, port: int, what: str, setting: str) -> None:
    if _port_taken(host, port):
        raise StartupError(f"{what}: port {port} on {host} is already in use; stop what holds it or set {setting}")


@dataclass(frozen=True)
class Listener:
    """Where a started process answers, and the setting that moves it."""

    host: str
    port: int
    setting: str


def start_process(
    settings: Settings, name: str, argv: list[str], env: dict[str, str], health: str, listener: Listener
) -> str:
    """Start one long-running process unless it already answers, then wait until it is healthy."""
    item = managed(settings, name)
    if read_pid(item) and check(health)[0]:
        return "already running"
    require_free(listener.host, listener.port, name, listener.setting)
    proc = spawn(item, argv, env)
    if not wait_healthy(health, settings.startup_timeout_s, lambda: proc.poll() is None):
        stop(item)
        raise StartupError(f"{name}: did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"
