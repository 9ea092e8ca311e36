"""The Nginx edge in tests: the session stack's own, and spare ones rendered from the same template
for limits too tight for the shared one (tests/integration/test_edge.py, tests/security/)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from cluster.edge import edge_dir, ensure_certificate, local_ca_file, local_config, nginx_binary, prepare_dirs, render
from cluster.sandbox import Stack, free_port
from core.health import wait_healthy


def require_edge(stack: Stack) -> Stack:
    if not stack.edge:
        pytest.fail("nginx is not installed: `make tools` installs it (the edge is part of the stack)")
    return stack


def openssl_s_client(edge: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """One TLS handshake with the edge; exit status 0 when it succeeded."""
    address = f"{edge.settings.nginx.host}:{edge.settings.nginx.https_port}"
    argv = ["openssl", "s_client", "-connect", address, "-CAfile", str(edge.verify), "-brief", *args]
    return subprocess.run(argv, input="", capture_output=True, text=True, timeout=30, check=False)


@contextmanager
def spare_edge(
    edge: Stack, state_dir: Path, nginx: dict[str, Any] | None = None, api: dict[str, Any] | None = None
) -> Iterator[Stack]:
    """Another Nginx in front of the same Serve ingress, on free ports, with `nginx` and `api`
    applied to its settings' groups (upstreams, rate limits). Stopped on exit."""
    ports = {"https_port": free_port(), "http_port": free_port(), "status_port": free_port()}
    settings = edge.settings.model_copy(
        update={
            "state_dir": state_dir,
            "nginx": edge.settings.nginx.model_copy(update={**ports, **(nginx or {})}),
            "api": edge.settings.api.model_copy(update=api or {}),
        }
    )
    prepare_dirs(settings)
    cert, key = ensure_certificate(settings)
    config = edge_dir(settings) / "nginx.conf"
    config.write_text(render(local_config(settings, None, None, cert, key)))
    binary = nginx_binary(settings)
    assert binary is not None
    argv = [binary, "-p", str(edge_dir(settings)), "-c", str(config), "-e", "stderr", "-g", "daemon off;"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = Stack(settings=settings, env=edge.env, api_key=edge.api_key)
    try:
        health = f"https://127.0.0.1:{settings.nginx.https_port}/healthz"
        assert wait_healthy(health, 30, lambda: proc.poll() is None, verify=str(local_ca_file(settings)))
        yield running
    finally:
        proc.terminate()
        proc.wait(10)
        running.http.close()
