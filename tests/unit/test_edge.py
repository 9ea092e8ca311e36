"""The Nginx edge's configuration: what `cluster up` renders and what compose ships."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from cluster.edge import (
    COMPOSE_NGINX,
    compose_config,
    ensure_certificate,
    local_config,
    prepare_dirs,
    render,
    write_htpasswd,
)
from core.settings import Settings

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")  # whatever NGINX_ENABLED says
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (make tools installs it)")


def _settings(tmp_path: Path, **groups: dict[str, Any]) -> Settings:
    # Secrets from the environment (the test session sets a Ray token) must not leak in.
    ray = {"auth_token": None, **groups.pop("ray", {})}
    mlflow = {"basic_auth_password": None, **groups.pop("mlflow", {})}
    return Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        api={"keys": "k"},
        ray=ray,
        mlflow=mlflow,
        serve=groups.get("serve", {}),
        nginx=groups.get("nginx", {}),
    )


def _nginx_test(config_text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert NGINX is not None
    config = tmp_path / "nginx-under-test.conf"
    config.write_text(config_text)
    argv = [NGINX, "-t", "-p", str(tmp_path), "-c", str(config), "-e", "stderr"]
    return subprocess.run(argv, capture_output=True, text=True, check=False)


def _local(tmp_path: Path, **groups: dict[str, Any]) -> tuple[Settings, str]:
    settings = _settings(tmp_path, **groups)
    cert, key = ensure_certificate(settings)
    htpasswd = write_htpasswd(settings, tmp_path / "htpasswd")
    prepare_dirs(settings)
    return settings, render(local_config(settings, "127.0.0.1:7860", htpasswd, cert, key))


@needs_nginx
def test_local_rendering_passes_nginx_t(tmp_path):
    _, text = _local(tmp_path, ray={"auth_token": "t" * 20}, mlflow={"basic_auth_password": "pw"})
    result = _nginx_test(text, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_protected_routes_close_without_their_credentials(tmp_path):
    """No Ray token: the dashboard is not proxied at all; no MLflow password: MLflow is not either."""
    _, text = _local(tmp_path)
    assert "proxy_pass http://ray_dashboard/" not in text
    assert "proxy_pass http://mlflow/" not in text
    assert '"error": "ray_closed"' in text
    assert '"error": "mlflow_closed"' in text
    _, opened = _local(tmp_path / "open", ray={"auth_token": "t" * 20}, mlflow={"basic_auth_password": "pw"})
    assert "proxy_pass http://ray_dashboard/" in opened
    mlflow_block = opened.split("location ^~ /mlflow/", 1)[1].split("}", 1)[0]
    assert "auth_basic_user_file" in mlflow_block


def test_tls_settings_are_modern(tmp_path):
    _, text = _local(tmp_path)
    assert re.search(r"ssl_protocols TLSv1\.2 TLSv1\.3;", text)
    ciphers = re.search(r"ssl_ciphers ([^;]+);", text)
    assert ciphers is not None
    for suite in ciphers.group(1).split(":"):
        assert suite.startswith("ECDHE-") and ("GCM" in suite or "CHACHA20" in suite), suite
    assert "Strict-Transport-Security" in text
    assert "server_tokens off;" in text
    assert "return 301 https://" in text


def test_listens_on_loopback_locally_and_everywhere_in_compose(tmp_path):
    settings, text = _local(tmp_path)
    assert f"listen 127.0.0.1:{settings.nginx.https_port} ssl" in text
    assert f"listen 127.0.0.1:{settings.nginx.http_port};" in text
    compose = render(compose_config())
    assert "listen 443 ssl;" in compose and "listen 80;" in compose


def test_certificate_is_issued_by_the_local_ca_and_reused(tmp_path):
    settings = _settings(tmp_path, nginx={"server_name": "platform.test"})
    cert_path, key_path = ensure_certificate(settings)
    ca_path = settings.state_dir / "tls" / "ca.pem"
    chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    leaf, ca = chain[0], x509.load_pem_x509_certificate(ca_path.read_bytes())
    assert leaf.issuer == ca.subject
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {"platform.test", "localhost"} <= set(names.get_values_for_type(x509.DNSName))
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    # A client that trusts the CA accepts the certificate for the configured name.
    verified = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_path), "-verify_hostname", "platform.test", str(cert_path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    before = cert_path.read_bytes()
    ensure_certificate(settings)
    assert cert_path.read_bytes() == before, "a current certificate must not be reissued on every `up`"
    renamed = _settings(tmp_path, nginx={"server_name": "other.test"})
    ensure_certificate(renamed)
    assert cert_path.read_bytes() != before, "a new server name needs a new certificate"
    assert ca_path.read_bytes() == ca.public_bytes(Encoding.PEM), "renewal keeps the CA clients already trust"


def test_htpasswd_holds_a_salted_sha512_crypt_hash(tmp_path):
    settings = _settings(tmp_path, mlflow={"basic_auth_password": "s3cret", "basic_auth_user": "ops"})
    target = write_htpasswd(settings, tmp_path / "htpasswd")
    assert target is not None
    user, hashed = target.read_text().strip().split(":", 1)
    assert user == "ops" and hashed.startswith("$6$") and "s3cret" not in hashed
    salt = hashed.split("$")[2]
    again = subprocess.run(
        ["openssl", "passwd", "-6", "-salt", salt, "-stdin"], input="s3cret", capture_output=True, text=True, check=True
    )
    assert again.stdout.strip() == hashed
    assert write_htpasswd(_settings(tmp_path), tmp_path / "htpasswd") is None
    assert not (tmp_path / "htpasswd").exists(), "removing the password must close the route"


def test_committed_compose_config_is_the_rendering():
    assert COMPOSE_NGINX.read_text() == render(compose_config()), "run `python -m cluster render-edge`"


@needs_nginx
def test_compose_rendering_passes_nginx_t(tmp_path):
    """The compose file with what only the container has swapped in: its upstream names resolve
    through compose's DNS at run time (`resolve`, nginx >= 1.27.3) and `http2 on` needs nginx
    >= 1.25.1, so both become their older forms for the nginx this machine has."""
    settings, _ = _local(tmp_path)
    cert, key = ensure_certificate(settings)
    text = render(compose_config())
    for host in ("ray-head", "ray-worker", "ui", "mlflow", "grafana"):
        text = re.sub(rf"\b{host}:(\d+)", r"127.0.0.1:\1", text)
    text = text.replace(" resolve;", ";").replace("listen 443 ssl;\n        http2 on;", "listen 443 ssl http2;")
    text = text.replace("/etc/nginx/certs/fullchain.pem", str(cert)).replace("/etc/nginx/certs/privkey.pem", str(key))
    text = text.replace("/var/run/nginx.pid", str(tmp_path / "nginx.pid"))
    text = text.replace("/etc/nginx/auth/htpasswd", str(tmp_path / "htpasswd"))
    result = _nginx_test(text, tmp_path)
    assert result.returncode == 0, result.stderr


def _serve_upstream_block(text: str) -> list[str]:
    block = text.split("upstream serve_ingress {", 1)[1].split("}", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip().startswith("server ")]


def test_predictions_fall_back_to_serves_own_proxy_when_haproxy_fails_them(tmp_path):
    settings, text = _local(tmp_path, serve={"port": 8000, "fallback_proxy_port": 8500})
    assert _serve_upstream_block(text) == [
        f"server {settings.serve.host}:8000 max_fails=2 fail_timeout=5s;",
        f"server {settings.serve.host}:8500 backup;",
    ]
    assert "server ray-head:8500 backup resolve;" in _serve_upstream_block(render(compose_config()))


def test_no_fallback_upstream_without_haproxy_or_with_upstreams_given(tmp_path):
    _, python_proxy = _local(tmp_path, serve={"haproxy": False})
    assert not any("backup" in line for line in _serve_upstream_block(python_proxy))
    _, explicit = _local(tmp_path, nginx={"serve_upstreams": ["10.0.0.5:8000"]})
    assert _serve_upstream_block(explicit) == ["server 10.0.0.5:8000 max_fails=2 fail_timeout=5s;"]
