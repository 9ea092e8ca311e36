"""The Nginx edge: one template, rendered for the local stack and for compose.

`cluster up` renders it with loopback upstreams, a locally generated certificate authority and
certificate, and an htpasswd file for MLflow; compose gets the same server with its service
names, written to cluster/nginx/nginx.compose.conf by `python -m cluster render-edge` (a test
keeps the committed file equal to the rendering).
"""

from __future__ import annotations

import datetime as dt
import getpass
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from core.settings import REPO_ROOT, Settings

NGINX_DIR = REPO_ROOT / "cluster" / "nginx"
TEMPLATE = "nginx.conf.j2"
COMPOSE_NGINX = NGINX_DIR / "nginx.compose.conf"
# Renew the local certificate this long before it expires.
RENEW_BEFORE = dt.timedelta(days=14)


@dataclass(frozen=True)
class EdgeConfig:
    """Everything the template needs; an upstream left out closes its route."""

    listen_prefix: str  # "127.0.0.1:" binds loopback only; "" every interface (a container)
    https_port: int
    http_port: int
    public_https_port: int  # where browsers are redirected to (a container's published port)
    server_name: str
    tls_cert: str
    tls_key: str
    serve_upstreams: list[str]
    upstreams: dict[str, str]  # ui, mlflow, grafana, ray_dashboard -> host:port
    htpasswd: str | None
    status_listen: str  # stub_status for the exporter: loopback, or the compose network only
    pid_file: str
    error_log: str
    access_log: str
    mime_types: str = "/etc/nginx/mime.types"
    temp_dir: str | None = None
    worker_user: str | None = None
    resolver: str | None = None
    acme_webroot: str | None = None
    http2_on: bool = False  # `http2 on;` needs nginx >= 1.25.1; older ones take `listen ... http2`
    rate_limit_rps: int = 500
    rate_limit_burst: int = 1000
    api_max_body_size: str = "2m"
    rendered_by: str = "`cluster up`"
    # Serve's own Python proxy behind HAProxy: where Nginx resends a prediction HAProxy failed
    # (a replica killed mid-request, none left running); its router holds the request until a
    # replica can take it.
    serve_backup_upstreams: list[str] = field(default_factory=list)


def render(config: EdgeConfig) -> str:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(NGINX_DIR),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,  # nginx syntax, not HTML
    )
    suffix = "" if config.public_https_port == 443 else f":{config.public_https_port}"
    return env.get_template(TEMPLATE).render(**vars(config), https_port_suffix=suffix)


# The local stack -------------------------------------------------------------------------------


def edge_dir(settings: Settings) -> Path:
    return settings.state_dir / "nginx"


def tls_dir(settings: Settings) -> Path:
    return settings.state_dir / "tls"


def local_ca_file(settings: Settings) -> Path:
    """The certificate clients trust for the locally generated server certificate."""
    if settings.tls.cert_file is not None:
        return settings.tls.cert_file
    return tls_dir(settings) / "ca.pem"


def local_config(settings: Settings, ui: str | None, htpasswd: Path | None, cert: Path, key: Path) -> EdgeConfig:
    directory = edge_dir(settings)
    upstreams = {"mlflow": f"{settings.mlflow.host}:{settings.mlflow.port}"}
    if ui is not None:
        upstreams["ui"] = ui
    if settings.grafana.url:
        upstreams["grafana"] = settings.grafana.url.split("://", 1)[-1].split("/", 1)[0]
    if settings.ray.auth_enabled:
        upstreams["ray_dashboard"] = f"{settings.ray.dashboard_host}:{settings.ray.dashboard_port}"
    return EdgeConfig(
        listen_prefix=f"{settings.nginx.host}:",
        https_port=settings.nginx.https_port,
        http_port=settings.nginx.http_port,
        public_https_port=settings.nginx.https_port,
        server_name=settings.nginx.server_name,
        tls_cert=str(cert),
        tls_key=str(key),
        serve_upstreams=settings.nginx.serve_upstreams or [f"{settings.serve.host}:{settings.serve.port}"],
        serve_backup_upstreams=(
            [f"{settings.serve.host}:{settings.serve.fallback_proxy_port}"]
            if settings.serve.haproxy and not settings.nginx.serve_upstreams
            else []
        ),
        upstreams=upstreams,
        htpasswd=str(htpasswd) if htpasswd else None,
        status_listen=f"127.0.0.1:{settings.nginx.status_port}",
        pid_file=str(directory / "nginx.pid"),
        error_log="stderr",
        access_log=str(settings.logs_dir / "nginx-access.log"),
        temp_dir=str(directory / "tmp"),
        # Run as root (CI, containers without users), the workers would drop to `nobody`, which can
        # read neither the state dir nor the htpasswd file; as any other user the line is ignored.
        worker_user=getpass.getuser() if os.geteuid() == 0 else None,
        rate_limit_rps=settings.api.rate_limit_rps,
        rate_limit_burst=settings.api.rate_limit_burst,
        api_max_body_size=settings.api.max_body_size,
    )


def nginx_binary(settings: Settings) -> str | None:
    if not settings.nginx.enabled:
        return None
    # Debian puts it in /usr/sbin, which a non-root PATH often lacks.
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")


def edge_health_url(settings: Settings) -> str:
    """The API's health check through Nginx: TLS, routing and the upstream in one request."""
    return f"https://{settings.nginx.host}:{settings.nginx.https_port}/healthz"


def local_edge_url(settings: Settings) -> str:
    """The API through Nginx at the address it binds. Clients on this machine use this rather than
    `settings.nginx.edge_url`, whose server name need not resolve here."""
    return f"https://{settings.nginx.host}:{settings.nginx.https_port}"


def bearer_headers(api_key: str) -> dict[str, str]:
    """What an API client sends to authenticate with `api_key`."""
    return {"Authorization": f"Bearer {api_key}"}


def prepare_dirs(settings: Settings) -> None:
    """The temp and log directories the rendered config names; nginx does not create them."""
    for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (edge_dir(settings) / "tmp" / sub).mkdir(parents=True, exist_ok=True)
    settings.logs_dir.mkdir(parents=True, exist_ok=True)


def write_local_config(settings: Settings, ui: str | None) -> Path:
    directory = edge_dir(settings)
    prepare_dirs(settings)
    cert, key = ensure_certificate(settings)
    htpasswd = write_htpasswd(settings, directory / "htpasswd")
    target = directory / "nginx.conf"
    target.write_text(render(local_config(settings, ui, htpasswd, cert, key)), encoding="utf-8")
    return target


def write_htpasswd(settings: Settings, target: Path) -> Path | None:
    """MLflow's basic-auth credentials as a SHA-512 crypt hash (nginx checks it with crypt(3))."""
    if settings.mlflow.basic_auth_password is None:
        target.unlink(missing_ok=True)
        return None
    hashed = subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"],
        input=settings.mlflow.basic_auth_password.get_secret_value(),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target.touch(mode=0o600, exist_ok=True)
    target.write_text(f"{settings.mlflow.basic_auth_user}:{hashed}\n", encoding="utf-8")
    return target


# Certificates ------------------------------------------------------------------------------------


def ensure_certificate(settings: Settings) -> tuple[Path, Path]:
    """The configured certificate, or a local CA and a server certificate signed by it.

    A CA of our own (rather than one self-signed leaf) is what clients can be told to trust once
    (`--cacert`, `ray job submit --verify`), and it survives renewing the server certificate.
    """
    if settings.tls.cert_file is not None and settings.tls.key_file is not None:
        return settings.tls.cert_file, settings.tls.key_file
    directory = tls_dir(settings)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "server.pem", directory / "server.key"
    if not _certificate_current(cert, settings.nginx.server_name):
        _issue(directory, settings.nginx.server_name)
    return cert, key


def _certificate_current(cert: Path, server_name: str) -> bool:
    if not cert.is_file():
        return False
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    names = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    expires = loaded.not_valid_after_utc
    return server_name in names.get_values_for_type(x509.DNSName) and expires - RENEW_BEFORE > _now()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _issue(directory: Path, server_name: str) -> None:
    ca_key_path, ca_path = directory / "ca.key", directory / "ca.pem"
    if ca_key_path.is_file() and ca_path.is_file():
        loaded_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        assert isinstance(loaded_key, ec.EllipticCurvePrivateKey)
        ca_key = loaded_key
        ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    else:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ray-cluster-platform local CA")])
        ca_cert = (
            _builder(ca_name, ca_name, ca_key.public_key(), dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # keyCertSign, cRLSign
            .sign(ca_key, hashes.SHA256())
        )
        _write_private(ca_key_path, _private_pem(ca_key))
        ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    key = ec.generate_private_key(ec.SECP256R1())
    alt_names: list[x509.GeneralName] = [x509.DNSName(server_name), x509.DNSName("localhost")]
    alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, server_name)])
    cert = (
        _builder(subject, ca_cert.subject, key.public_key(), dt.timedelta(days=397))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / "server.key", _private_pem(key))
    # The chain nginx serves: the server certificate, then the CA that signed it.
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    (directory / "server.pem").write_bytes(chain)


def _builder(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, valid: dt.timedelta
) -> x509.CertificateBuilder:
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + valid)
    )


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


# Compose -----------------------------------------------------------------------------------------


def compose_config() -> EdgeConfig:
    return EdgeConfig(
        listen_prefix="",
        https_port=443,
        http_port=80,
        public_https_port=443,
        server_name="_",
        tls_cert="/etc/nginx/certs/fullchain.pem",
        tls_key="/etc/nginx/certs/privkey.pem",
        # Every Ray node runs a Serve proxy; scaled workers are found through compose's DNS.
        serve_upstreams=["ray-head:8000", "ray-worker:8000"],
        serve_backup_upstreams=["ray-head:8500"],
        upstreams={
            "ui": "ui:7860",
            "mlflow": "mlflow:5000",
            "grafana": "grafana:3000",
            "ray_dashboard": "ray-head:8265",
        },
        htpasswd="/etc/nginx/auth/htpasswd",
        status_listen="8081",
        pid_file="/var/run/nginx.pid",
        error_log="/dev/stderr",
        access_log="/dev/stdout",
        resolver="127.0.0.11",
        acme_webroot="/var/www/certbot",
        http2_on=True,
        rendered_by="`python -m cluster render-edge`",
    )


def write_compose_file() -> Path:
    COMPOSE_NGINX.write_text(render(compose_config()), encoding="utf-8")
    return COMPOSE_NGINX
