"""The edge speaks TLS 1.2 and 1.3 only, with forward-secret AEAD suites: handshakes with
`openssl s_client` against the stack's Nginx, and the suites its configuration enables."""

from __future__ import annotations

import re
import subprocess

import pytest

from cluster.edge import edge_dir
from cluster.sandbox import Stack
from tests.edge_helpers import openssl_s_client, require_edge

# Classes that must never be negotiated, as OpenSSL cipher strings. `@SECLEVEL=0` lets this client
# offer what its library still has (this OpenSSL 3 build has no RC4, 3DES or EXPORT suites left:
# those classes are checked in the server's configuration instead, below).
WEAK_CIPHER_CLASSES = ["RC4", "3DES", "DES", "NULL", "EXPORT", "aNULL", "eNULL", "MD5", "kRSA", "SHA1"]
# What the client says when it could not even offer the handshake asked of it: such a failure
# proves nothing about the server.
CLIENT_SIDE_FAILURES = ("no cipher match", "no protocols available", "unknown option")


@pytest.fixture(scope="module")
def edge(stack: Stack) -> Stack:
    return require_edge(stack)


def client_can_offer(cipher: str) -> bool:
    listed = subprocess.run(["openssl", "ciphers", f"{cipher}:@SECLEVEL=0"], capture_output=True, check=False)
    return listed.returncode == 0


def refused_by_server(handshake: subprocess.CompletedProcess[str]) -> bool:
    output = handshake.stdout + handshake.stderr
    return handshake.returncode != 0 and not any(failure in output for failure in CLIENT_SIDE_FAILURES)


@pytest.mark.parametrize("protocol", ["-tls1_2", "-tls1_3"])
def test_tls_12_and_13_are_accepted(edge: Stack, protocol: str) -> None:
    handshake = openssl_s_client(edge, protocol)
    assert handshake.returncode == 0, handshake.stderr[-1000:]
    assert "Verification: OK" in handshake.stderr


@pytest.mark.parametrize("protocol", ["-tls1", "-tls1_1"])
def test_tls_10_and_11_are_refused(edge: Stack, protocol: str) -> None:
    handshake = openssl_s_client(edge, protocol, "-cipher", "DEFAULT:@SECLEVEL=0")
    assert refused_by_server(handshake), handshake.stdout[-500:] + handshake.stderr[-500:]


def test_weak_ciphers_are_refused_at_tls_12(edge: Stack) -> None:
    offered = [cipher for cipher in WEAK_CIPHER_CLASSES if client_can_offer(cipher)]
    assert {"NULL", "aNULL", "MD5"} <= set(offered), offered  # else this test would check nothing
    accepted = [
        c for c in offered if not refused_by_server(openssl_s_client(edge, "-tls1_2", "-cipher", f"{c}:@SECLEVEL=0"))
    ]
    assert not accepted, f"the edge negotiated {accepted} at TLS 1.2"


def test_configured_suites_are_forward_secret_aead_only(edge: Stack) -> None:
    """Every TLS 1.2 suite the running config enables, as the system's OpenSSL (Nginx's library)
    expands it: covers the classes this client can no longer offer."""
    config = (edge_dir(edge.settings) / "nginx.conf").read_text()
    protocols = re.search(r"^\s*ssl_protocols ([^;]+);", config, re.MULTILINE)
    assert protocols is not None and protocols.group(1).split() == ["TLSv1.2", "TLSv1.3"]
    ciphers = re.search(r"^\s*ssl_ciphers ([^;]+);", config, re.MULTILINE)
    assert ciphers is not None
    listed = subprocess.run(
        ["openssl", "ciphers", "-v", "-tls1_2", ciphers.group(1)], capture_output=True, text=True, check=True
    )
    suites = [line.split() for line in listed.stdout.splitlines() if "TLSv1.2" in line.split()[1:2]]
    assert suites
    for name, _, kx, au, enc, mac in (s[:6] for s in suites):
        assert kx.startswith("Kx=ECDH"), name  # forward secret
        assert au != "Au=None", name
        assert mac == "Mac=AEAD" and any(a in enc for a in ("GCM", "CHACHA20")), name
        assert not any(weak in name for weak in ("RC4", "DES", "NULL", "EXP", "MD5", "ADH", "AECDH")), name


def test_tls_12_negotiates_a_forward_secret_aead_suite(edge: Stack) -> None:
    handshake = openssl_s_client(edge, "-tls1_2")
    assert handshake.returncode == 0, handshake.stderr[-1000:]
    suite = next(line for line in handshake.stderr.splitlines() if line.startswith("Ciphersuite:"))
    assert "ECDHE" in suite and ("GCM" in suite or "CHACHA20" in suite), suite
