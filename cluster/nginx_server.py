"""The Nginx edge of the local stack as a process: checked, started, reloaded in place.
Its configuration is cluster/edge.py's."""

from __future__ import annotations

import os
import signal
import subprocess

from cluster.edge import edge_dir, edge_health_url, local_ca_file, write_local_config
from cluster.startup import StartupError, require_free
from cluster.supervisor import log_tail, managed, read_pid, spawn, stop
from core.health import wait_healthy
from core.settings import Settings


def start_nginx(settings: Settings, env: dict[str, str], binary: str, ui: str | None) -> str:
    """TLS termination and the routes to every UI; reloaded in place when `up` runs again."""
    item = managed(settings, "nginx")
    rendered = edge_dir(settings) / "nginx.conf"
    previous = rendered.read_text(encoding="utf-8") if rendered.is_file() else None
    config = write_local_config(settings, ui)
    argv = [binary, "-p", str(edge_dir(settings)), "-c", str(config), "-e", "stderr"]
    checked = subprocess.run([*argv, "-t", "-q"], capture_output=True, text=True, check=False)
    if checked.returncode != 0:
        raise StartupError(f"nginx: configuration {config} rejected: {checked.stderr.strip().splitlines()[-1:]}")
    verify = str(local_ca_file(settings))
    pid = read_pid(item)
    if pid is not None:
        if config.read_text(encoding="utf-8") == previous:
            # A reload closes every idle kept-alive connection, and a client that sends on one
            # at that moment gets a reset: restarting another component must not cost that.
            return "already running"
        os.kill(pid, signal.SIGHUP)  # graceful reload: old workers finish their requests
        return "already running (configuration reloaded)"
    require_free(settings.nginx.host, settings.nginx.https_port, "nginx", "NGINX_HTTPS_PORT")
    require_free(settings.nginx.host, settings.nginx.http_port, "nginx", "NGINX_HTTP_PORT")
    proc = spawn(item, [*argv, "-g", "daemon off;"], env)
    if not wait_healthy(
        edge_health_url(settings), settings.startup_timeout_s, lambda: proc.poll() is None, verify=verify
    ):
        stop(item)
        raise StartupError(f"nginx: did not become healthy; see {item.log_file}: {log_tail(item, 1)}")
    return "started"
