"""What is reachable without going through the edge. In compose, tests/unit/test_compose.py
already holds that only Nginx publishes ports and that no Ray port is among them; this adds
Grafana's login, and the native stack's Ray dashboard, which must listen on loopback only."""

from __future__ import annotations

import ipaddress

import psutil

from cluster.sandbox import Stack
from tests.compose_file import environment, services


def test_grafana_has_no_anonymous_access_and_a_required_admin_password() -> None:
    env = environment(services()["grafana"])
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
    # `${VAR:?message}`: compose refuses to start without it; there is no default to fall back on.
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?"), env["GF_SECURITY_ADMIN_PASSWORD"]
    assert not services()["grafana"].get("ports"), "Grafana is reached through Nginx only"


def listening_addresses(port: int) -> set[str]:
    return {
        conn.laddr.ip
        for conn in psutil.net_connections(kind="tcp")
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port
    }


def test_the_dashboard_and_jobs_api_listen_on_loopback_only(stack: Stack) -> None:
    """Nginx is the way in. Every other port of the stack is held to loopback too, or listed with
    what guards it (test_listening_sockets.py); the GCS also refuses a driver without the token
    (test_operator_auth.py)."""
    port = stack.settings.ray.dashboard_port
    addresses = listening_addresses(port)
    assert addresses, f"nothing listens on the dashboard port {port}"
    public = [a for a in addresses if not ipaddress.ip_address(a).is_loopback]
    assert not public, f"the dashboard port {port} listens on {public}"
