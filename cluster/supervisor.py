"""Start and stop the stack's local processes, each in its own session, tracked by pid files.

`down` signals only the sessions that `up` recorded, so it never touches another Ray cluster,
MLflow server or anything else on the machine.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
from dotenv import dotenv_values

from core.settings import REPO_ROOT, Settings


@dataclass(frozen=True)
class Managed:
    name: str
    pid_file: Path
    log_file: Path


def managed(settings: Settings, name: str) -> Managed:
    return Managed(name, settings.state_dir / "pids" / f"{name}.pid", settings.logs_dir / f"{name}.log")


# Ray's switch for a cluster of one machine (its default on Windows and macOS).
LOCAL_CLUSTER_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_cluster_environment(settings: Settings) -> dict[str, str]:
    """What holds a loopback Ray head to loopback, and lets the stack's drivers reach it.

    `ray start` and `ray.init` swap a loopback address (`--node-ip-address`, the GCS address) for
    the machine's routable one (`resolve_ip_for_localhost` in ray/_private/services.py), and Ray's
    servers then bind every interface. Told that the cluster is this machine only, Ray keeps the
    loopback address: the GCS, raylet, workers, agents, Ray Client server and metrics endpoints
    bind loopback, and a driver with the same switch finds the GCS there. `ray start` then refuses
    to join a node to the cluster. A RAY_HOST other than loopback, a head that other machines
    join, leaves Ray's own choice alone.
    """
    return {LOCAL_CLUSTER_VARIABLE: "0"} if settings.ray.local_only else {}


def child_environment(settings: Settings) -> dict[str, str]:
    """What every process of the stack sees: .env, the settings' derived values, our code."""
    env = dict(os.environ)
    for dotenv in (REPO_ROOT / ".env", Path.cwd() / ".env"):
        if dotenv.is_file():
            env.update({k: v for k, v in dotenv_values(dotenv).items() if v is not None and k not in os.environ})
    python_path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{python_path}" if python_path else str(REPO_ROOT)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["STATE_DIR"] = str(settings.state_dir)
    env["MLFLOW_TRACKING_URI"] = settings.mlflow.tracking_uri
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env.update(settings.s3_environment())
    env.update(settings.serve_environment())
    env.update(local_cluster_environment(settings))
    if settings.ray.auth_token is not None:
        # Every Ray process and client of the stack (head, workers, job drivers, `serve deploy`,
        # the dispatcher) presents the cluster's token; Ray refuses anyone without it.
        env["RAY_AUTH_MODE"] = "token"
        env["RAY_AUTH_TOKEN"] = settings.ray.auth_token.get_secret_value()
    return env


def read_pid(item: Managed) -> int | None:
    try:
        pid = int(item.pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if psutil.pid_exists(pid) else None


def spawn(item: Managed, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    item.pid_file.parent.mkdir(parents=True, exist_ok=True)
    item.log_file.parent.mkdir(parents=True, exist_ok=True)
    log = item.log_file.open("ab")
    proc = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        cwd=REPO_ROOT,
        start_new_session=True,  # its own session: `down` can end it and all it spawned
    )
    item.pid_file.write_text(str(proc.pid))
    return proc


def session_members(sid: int) -> list[psutil.Process]:
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid:
                members.append(proc)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _running(procs: list[psutil.Process]) -> list[psutil.Process]:
    """Processes still running. Zombies count as gone: once the session leader's parent has
    exited nobody may reap them, and waiting on them would only burn the grace period."""
    alive = []
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
    return alive


def _signal_all(procs: list[psutil.Process], sig: signal.Signals) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(sig)


def stop(item: Managed, grace_s: float = 20.0) -> bool:
    """SIGTERM the process's session, SIGKILL what is left after the grace period."""
    from core.health import wait_until

    pid = read_pid(item)
    if pid is None:
        item.pid_file.unlink(missing_ok=True)
        return False
    members = session_members(pid)
    _signal_all(_running(members), signal.SIGTERM)
    if not wait_until(lambda: not _running(members), grace_s, max_wait_s=0.5):
        _signal_all(_running(members), signal.SIGKILL)
    # Anything spawned during shutdown still carries our session id; sweep once more.
    _signal_all(_running(session_members(pid)), signal.SIGKILL)
    wait_until(lambda: not _running(session_members(pid)), 10, max_wait_s=0.5)
    item.pid_file.unlink(missing_ok=True)
    return True


def log_tail(item: Managed, lines: int = 5) -> str:
    try:
        text = item.log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return "\n".join(text[-lines:])
