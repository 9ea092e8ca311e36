"""Static checks of the container deployment: compose.yaml, the Dockerfile, .dockerignore and the
scripts the containers run.

No Docker engine runs here, so nothing is built or started: `docker-compose config` (v1, Debian's
package) validates and interpolates the file, hadolint lints the Dockerfile, shellcheck the
scripts, and the rest reads the files. The scripts themselves run natively elsewhere (see
docs/deployment.md)."""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from core.settings import REPO_ROOT
from tests.compose_file import COMPOSE_FILE, compose, environment, services

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
NGINX_CONF = REPO_ROOT / "cluster/nginx/nginx.compose.conf"
PLATFORM_IMAGE = "ray-cluster-platform"
# The label a service carries when its image cannot run any health check; the value says why.
NO_HEALTHCHECK_LABEL = "platform.healthcheck"
# Every `${VAR:?}` of compose.yaml, with values that only need to be well-formed.
REQUIRED_ENV = {
    "API_KEYS": "test-key-1,test-key-2",
    "GRAFANA_ADMIN_PASSWORD": "not-a-secret",
    "MINIO_ROOT_USER": "minio",
    "MINIO_ROOT_PASSWORD": "not-a-secret",
    "MLFLOW_BASIC_AUTH_PASSWORD": "not-a-secret",
    "POSTGRES_PASSWORD": "postgres-test-password",
    "RABBITMQ_PASSWORD": "notasecret",
    "RAY_AUTH_TOKEN": "test-ray-token",
    "UI_API_KEY": "test-key-1",
    "UI_PASSWORD": "not-a-secret",
}
# Every process that runs Ray or talks to it.
RAY_SERVICES = {"ray-head", "ray-worker", "dispatcher"}
# Ray's GCS, client server, dashboard/Jobs API, dashboard agent, metrics, Serve's proxy.
RAY_PORTS = {6380, 10001, 8265, 52365, 8090, 8000}
# The scripts compose runs, bind-mounted or from the image.
SCRIPTS = sorted({REPO_ROOT / path for path in re.findall(r"cluster/[\w./-]+\.sh", COMPOSE_FILE.read_text())})


def variables(text: str, required_only: bool = False) -> set[str]:
    """Variables compose interpolates (`$${...}` is an escaped `$` for the container's shell)."""
    pattern = r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)" + (r":\?" if required_only else "")
    return set(re.findall(pattern, text))


def run_compose(tmp_path: Path, values: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed; CI installs it (Debian package `docker-compose`)")
    # Only these values: neither a developer's .env nor the environment fills a gap.
    env_file = tmp_path / "test.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        [binary, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- docker-compose config ---------------------------------------------------------------------


@pytest.mark.parametrize("profile", [[], ["--profile", "letsencrypt"]], ids=["default", "letsencrypt"])
def test_config_is_valid(tmp_path: Path, profile: list[str]) -> None:
    result = run_compose(tmp_path, REQUIRED_ENV, *profile, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_test_env_covers_every_required_variable() -> None:
    assert variables(COMPOSE_FILE.read_text(), required_only=True) == set(REQUIRED_ENV)


@pytest.mark.parametrize("missing", sorted(REQUIRED_ENV))
def test_a_missing_secret_is_named(tmp_path: Path, missing: str) -> None:
    values = {key: value for key, value in REQUIRED_ENV.items() if key != missing}
    result = run_compose(tmp_path, values, "config", "-q")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert f"set {missing} in .env" in last, result.stderr[-500:]


def test_interpolated_config(tmp_path: Path) -> None:
    result = run_compose(tmp_path, REQUIRED_ENV, "config")
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)["services"]
    for name in RAY_SERVICES:
        env = resolved[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_AUTH_TOKEN"] == REQUIRED_ENV["RAY_AUTH_TOKEN"], name
    # The database password reaches clients only as PGPASSWORD, never inside a URL.
    for name in (*RAY_SERVICES, "mlflow"):
        env = resolved[name]["environment"]
        assert env["PGPASSWORD"] == REQUIRED_ENV["POSTGRES_PASSWORD"], name
        urls = [value for key, value in env.items() if key.endswith(("_URL", "_URI"))]
        assert not any(REQUIRED_ENV["POSTGRES_PASSWORD"] in url for url in urls), name
    # docker-compose v1 prints the long form: {published: 80, target: 80}.
    ports = {(int(port["published"]), int(port["target"])) for port in resolved["nginx"]["ports"]}
    assert ports == {(80, 80), (443, 443)}


# --- Shape of the stack ------------------------------------------------------------------------


def test_only_nginx_publishes_ports() -> None:
    published = sorted(name for name, service in services().items() if service.get("ports"))
    assert published == ["nginx"], f"only the Nginx edge may publish ports: {published}"
    targets = {str(port).rsplit(":", 1)[-1] for port in services()["nginx"]["ports"]}
    assert targets == {"80", "443"}


def test_ray_containers_use_token_authentication() -> None:
    talks_to_ray = {
        name for name, service in services().items() if any(k.startswith("RAY_") for k in environment(service))
    }
    assert talks_to_ray >= RAY_SERVICES, RAY_SERVICES - talks_to_ray
    for name in talks_to_ray:
        env = environment(services()[name])
        assert env.get("RAY_AUTH_MODE") == "token", f"{name}: RAY_AUTH_MODE must be token"
        assert env.get("RAY_AUTH_TOKEN", "").startswith("${RAY_AUTH_TOKEN:?"), (
            f"{name}: RAY_AUTH_TOKEN must be required"
        )
    for name in RAY_SERVICES:
        assert not services()[name].get("ports"), f"{name} publishes ports"
    for port in services()["nginx"]["ports"]:
        assert int(str(port).rsplit(":", 1)[-1]) not in RAY_PORTS


def test_workers_and_dispatchers_scale() -> None:
    for name in ("ray-worker", "dispatcher"):
        service = services()[name]
        for key in ("container_name", "ports", "hostname"):
            assert key not in service, f"{name}: {key} prevents `--scale {name}=N`"
    assert "ray-head:" in " ".join(services()["ray-worker"]["command"])


def test_no_ip_addresses() -> None:
    """Services find each other by compose's DNS names; only loopback (health checks inside a
    container) and the wildcard bind address appear."""
    found = set(re.findall(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])", COMPOSE_FILE.read_text()))
    addresses = {text for text in found if _is_ip(text)}
    assert addresses <= {"127.0.0.1", "0.0.0.0"}, addresses
    assert "ipv4_address" not in COMPOSE_FILE.read_text()


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def test_platform_image_is_built_once_and_shared() -> None:
    text = COMPOSE_FILE.read_text()
    assert len(re.findall(r"^\s*build:", text, flags=re.MULTILINE)) == 1, "one build section, in an x- block"
    anchors = {key: value for key, value in compose().items() if key.startswith("x-")}
    assert any(isinstance(block, dict) and "build" in block for block in anchors.values())
    built = {name: service for name, service in services().items() if "build" in service}
    assert RAY_SERVICES | {"mlflow", "ui", "tls-init"} <= set(built)
    for name, service in services().items():
        uses_image = service["image"].split(":")[0] == PLATFORM_IMAGE
        assert uses_image == (name in built), f"{name}: the platform image comes with its build section"
    assert len({(s["image"], repr(s["build"])) for s in built.values()}) == 1
    assert next(iter(built.values()))["build"]["context"] == "."


def test_restart_policies() -> None:
    for name, service in services().items():
        restart = str(service.get("restart", "no"))
        assert restart in {"unless-stopped", "no"}, f"{name}: restart {restart}"
        if restart == "no":
            assert not service.get("healthcheck"), f"{name} is one-shot but has a healthcheck"


# --- Health checks and start order ------------------------------------------------------------


def has_healthcheck(service: dict[str, Any]) -> bool:
    check = service.get("healthcheck") or {}
    return not check.get("disable") and check.get("test") not in (None, ["NONE"], "NONE")


def documented_without_healthcheck(service: dict[str, Any]) -> bool:
    labels = service.get("labels") or {}
    if isinstance(labels, list):
        labels = dict(label.split("=", 1) for label in labels)
    return str(labels.get(NO_HEALTHCHECK_LABEL, "")).startswith("none:")


def one_shot(service: dict[str, Any]) -> bool:
    return str(service.get("restart", "no")) == "no"


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """dependency -> condition; the short list form means service_started."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def test_long_running_services_have_healthchecks() -> None:
    for name, service in services().items():
        if one_shot(service):
            continue
        assert has_healthcheck(service) or documented_without_healthcheck(service), (
            f"{name}: no healthcheck; add one, or the label {NO_HEALTHCHECK_LABEL}: 'none: <why>'"
        )
        assert not (has_healthcheck(service) and documented_without_healthcheck(service)), name
    undocumented = [n for n, s in services().items() if not one_shot(s) and not has_healthcheck(s)]
    # Only images without any shell or HTTP client; nothing depends on them being healthy.
    assert sorted(undocumented) == ["nginx-exporter", "otel-collector"], undocumented


def test_dependencies_wait_for_health_or_completion() -> None:
    all_services = services()
    for name, service in all_services.items():
        for dependency, condition in depends_on(service).items():
            assert dependency in all_services, f"{name} depends on unknown {dependency}"
            target = all_services[dependency]
            if condition == "service_healthy":
                assert has_healthcheck(target), f"{name} waits for {dependency} to be healthy, which has no check"
            elif condition == "service_completed_successfully":
                assert one_shot(target), f"{name} waits for {dependency} to finish, but it restarts"
            elif condition == "service_started":
                assert documented_without_healthcheck(target), (
                    f"{name} waits only for {dependency} to start; use service_healthy"
                )
            else:
                pytest.fail(f"{name}: unknown depends_on condition {condition!r}")


def test_services_with_dependents_have_healthchecks() -> None:
    all_services = services()
    needed = {dependency for service in all_services.values() for dependency in depends_on(service)}
    for dependency in needed:
        target = all_services[dependency]
        assert has_healthcheck(target) or one_shot(target) or documented_without_healthcheck(target), dependency


def test_start_order() -> None:
    all_services = services()
    assert depends_on(all_services["ray-worker"]) == {"ray-head": "service_healthy"}
    assert depends_on(all_services["nginx"])["tls-init"] == "service_completed_successfully"
    for name in ("ray-head", "mlflow", "loki", "tempo"):
        assert depends_on(all_services[name])["minio-init"] == "service_completed_successfully", name
    for name in ("ray-head", "dispatcher"):
        deps = depends_on(all_services[name])
        assert deps.get("postgres") == deps.get("rabbitmq") == "service_healthy", name


# --- Files, images, variables ------------------------------------------------------------------


def bind_sources(service: dict[str, Any]) -> list[str]:
    sources = []
    for volume in service.get("volumes", []):
        source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
        if source.startswith(("./", "../", "/")):
            sources.append(source)
    return sources


def test_bind_mounted_paths_exist_in_the_repository() -> None:
    for name, service in services().items():
        for source in bind_sources(service):
            assert source.startswith("./"), f"{name}: {source} is outside the repository"
            assert (REPO_ROOT / source).exists(), f"{name}: {source} does not exist"


def test_named_volumes_are_declared() -> None:
    declared = set(compose()["volumes"])
    used = {
        str(volume).split(":")[0]
        for service in services().values()
        for volume in service.get("volumes", [])
        if not str(volume).startswith(("./", "/"))
    }
    assert used == declared, (used - declared, declared - used)


def test_every_image_is_pinned() -> None:
    for name, service in services().items():
        image = service["image"]
        if "build" in service:
            continue  # built from this repository; IMAGE_TAG names the build
        tag = image.rsplit(":", 1)[1] if ":" in image.split("/")[-1] else ""
        assert tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"


def test_every_variable_is_documented() -> None:
    example = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    missing = variables(COMPOSE_FILE.read_text()) - documented
    assert not missing, f"compose reads these, .env.example does not document them: {sorted(missing)}"
    required = variables(COMPOSE_FILE.read_text(), required_only=True)
    set_lines = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", example, flags=re.MULTILINE))
    # Required secrets appear as `VAR=` to fill in (UI_API_KEY is documented with the UI's block).
    assert required - set_lines <= {"UI_API_KEY"}, required - set_lines


def test_commands_from_the_image_exist_in_the_build_context() -> None:
    ignored = [line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()]
    for name, service in services().items():
        if "build" not in service:
            continue
        command = service.get("command") or []
        for path in re.findall(r"/app/([\w./-]+)", " ".join(command)):
            assert (REPO_ROOT / path).is_file(), f"{name}: {path} is not in the repository"
            assert path.split("/")[0] not in ignored, f"{name}: {path} is excluded by .dockerignore"


# --- Nginx and TLS -----------------------------------------------------------------------------


def test_nginx_mounts_what_its_config_reads() -> None:
    nginx = services()["nginx"]
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in nginx["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == "./cluster/nginx/nginx.compose.conf"
    assert all(str(v).endswith(":ro") for v in nginx["volumes"]), "Nginx mounts everything read-only"
    conf = NGINX_CONF.read_text()
    for path, volume in (
        ("/etc/nginx/certs/fullchain.pem", "tls-certs"),
        ("/etc/nginx/certs/privkey.pem", "tls-certs"),
        ("/etc/nginx/auth/htpasswd", "nginx-auth"),
        ("/var/www/certbot", "acme-webroot"),
    ):
        assert path in conf, f"nginx.compose.conf does not read {path}"
        mount = next(target for target in mounts if path.startswith(target))
        assert mounts[mount] == volume, path


def test_nginx_upstreams_are_compose_services() -> None:
    all_services = services()
    servers = re.findall(r"^\s*server\s+([a-z][\w-]*):(\d+)\b", NGINX_CONF.read_text(), flags=re.MULTILINE)
    assert servers
    for host, port in servers:
        assert host in all_services, f"nginx.compose.conf names {host}, which is no compose service"
        assert port in {str(p) for p in all_services[host].get("expose", [])}, f"{host} does not expose {port}"
    assert {("ray-head", "8000"), ("ui", "7860"), ("mlflow", "5000"), ("grafana", "3000"), ("ray-head", "8265")} <= set(
        servers
    )


def test_nginx_health_check_fetches_the_file_tls_init_writes() -> None:
    test = " ".join(services()["nginx"]["healthcheck"]["test"])
    path = re.search(r"http://127\.0\.0\.1(/\S+)", test)
    assert path is not None
    script = (REPO_ROOT / "cluster/tls/tls-init.sh").read_text()
    assert path.group(1).removeprefix("/.well-known/acme-challenge/") in script
    assert "location /.well-known/acme-challenge/" in NGINX_CONF.read_text()


def test_certbot_is_an_opt_in_profile_writing_where_nginx_reads() -> None:
    certbot = services()["certbot"]
    assert certbot["profiles"] == ["letsencrypt"]
    shared = {"tls-certs:/etc/nginx/certs", "acme-webroot:/var/www/certbot"}
    assert shared <= set(certbot["volumes"])
    assert "tls-certs:/etc/nginx/certs" in services()["tls-init"]["volumes"]
    script = (REPO_ROOT / "cluster/tls/certbot.sh").read_text()
    assert "--webroot" in script and "deploy-hook" in script


# --- Scripts -----------------------------------------------------------------------------------


def tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes with the dev extras (`make venv`)")
    return found


def test_scripts_pass_shellcheck() -> None:
    assert len(SCRIPTS) >= 5, SCRIPTS
    result = subprocess.run([tool("shellcheck"), *map(str, SCRIPTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_scripts_are_executable(script: Path) -> None:
    # The postgres image sources (rather than runs) init scripts without the executable bit.
    assert os.access(script, os.X_OK), script


def run_script(script: str, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    base = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run(
        ["sh", str(REPO_ROOT / script), *args], env=base | env, capture_output=True, text=True, timeout=60
    )


def tls_env(tmp_path: Path, domain: str = "platform.example.org") -> dict[str, str]:
    return {
        "TLS_CERTS_DIR": str(tmp_path / "certs"),
        "HTPASSWD_DIR": str(tmp_path / "auth"),
        "ACME_WEBROOT": str(tmp_path / "www"),
        "TLS_DOMAIN": domain,
        "MLFLOW_BASIC_AUTH_USER": "mlflow",
        "MLFLOW_BASIC_AUTH_PASSWORD": "p@ss word$1",
        "NGINX_GID": str(os.getgid()),
    }


def openssl(*args: str, stdin: str | None = None) -> str:
    return subprocess.run(["openssl", *args], input=stdin, capture_output=True, text=True, check=True).stdout.strip()


def test_tls_init_writes_a_self_signed_certificate_once(tmp_path: Path) -> None:
    env = tls_env(tmp_path)
    result = run_script("cluster/tls/tls-init.sh", env)
    assert result.returncode == 0, result.stderr
    cert, key = tmp_path / "certs/fullchain.pem", tmp_path / "certs/privkey.pem"
    assert "platform.example.org" in openssl("x509", "-noout", "-ext", "subjectAltName", "-in", str(cert))
    assert key.stat().st_mode & 0o077 == 0, "the key is readable by its owner only"
    first = cert.read_bytes()
    assert run_script("cluster/tls/tls-init.sh", env).returncode == 0
    assert cert.read_bytes() == first, "a current certificate is kept"
    assert run_script("cluster/tls/tls-init.sh", tls_env(tmp_path, "other.example.org")).returncode == 0
    assert cert.read_bytes() != first, "a self-signed certificate for another name is replaced"
    # Nginx's health check fetches this file over plain HTTP.
    assert (tmp_path / "www/.well-known/acme-challenge/nginx-health").read_text() == "ok\n"


def test_tls_init_never_replaces_a_real_certificate(tmp_path: Path) -> None:
    env = tls_env(tmp_path)
    certs = tmp_path / "certs"
    certs.mkdir()
    # A certificate signed by a CA (subject != issuer), as Let's Encrypt's is, for another name.
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca_key, ca, csr = (str(tmp_path / name) for name in ("ca.key", "ca.pem", "leaf.csr"))
    openssl("req", "-x509", *ec, "-days", "2", "-subj", "/CN=Test CA", "-keyout", ca_key, "-out", ca)
    openssl("req", *ec, "-subj", "/CN=other", "-keyout", str(certs / "privkey.pem"), "-out", csr)
    leaf = str(certs / "fullchain.pem")
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days", "1", "-out", leaf)
    before = (certs / "fullchain.pem").read_bytes()
    result = run_script("cluster/tls/tls-init.sh", env)
    assert result.returncode == 0, result.stderr
    assert (certs / "fullchain.pem").read_bytes() == before


def test_tls_init_writes_htpasswd_that_verifies(tmp_path: Path) -> None:
    env = tls_env(tmp_path)
    assert run_script("cluster/tls/tls-init.sh", env).returncode == 0
    user, hashed = (tmp_path / "auth/htpasswd").read_text().strip().split(":", 1)
    assert user == "mlflow" and hashed.startswith("$6$")
    salt = hashed.split("$")[2]
    again = openssl("passwd", "-6", "-salt", salt, "-stdin", stdin=env["MLFLOW_BASIC_AUTH_PASSWORD"])
    assert again == hashed
    missing = {k: v for k, v in env.items() if k != "MLFLOW_BASIC_AUTH_PASSWORD"}
    result = run_script("cluster/tls/tls-init.sh", missing)
    assert result.returncode != 0 and "MLFLOW_BASIC_AUTH_PASSWORD" in result.stderr


def test_certbot_deploy_hook_installs_the_certificate(tmp_path: Path) -> None:
    lineage = tmp_path / "live/platform.example.org"
    lineage.mkdir(parents=True)
    (lineage / "fullchain.pem").write_text("chain\n")
    (lineage / "privkey.pem").write_text("key\n")
    (tmp_path / "certs").mkdir()
    env = {"TLS_CERTS_DIR": str(tmp_path / "certs"), "RENEWED_LINEAGE": str(lineage)}
    result = run_script("cluster/tls/certbot.sh", env, "deploy-hook")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "certs/fullchain.pem").read_text() == "chain\n"
    assert (tmp_path / "certs/privkey.pem").stat().st_mode & 0o077 == 0
    assert not list((tmp_path / "certs").glob("*.new"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TLS_DOMAIN": "platform.example.org"}, "LETSENCRYPT_EMAIL"),
        ({"TLS_DOMAIN": "localhost", "LETSENCRYPT_EMAIL": "ops@example.org"}, "not a public name"),
    ],
)
def test_certbot_refuses_to_start_without_what_it_needs(env: dict[str, str], message: str) -> None:
    result = run_script("cluster/tls/certbot.sh", env)
    assert result.returncode != 0
    assert message in result.stderr


# --- Dockerfile --------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run(
        [tool("hadolint"), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_image_is_pinned() -> None:
    steps = instructions()
    args = dict(re.findall(r"^(\w+)=(\S+)", "\n".join(a for i, a in steps if i == "ARG"), flags=re.MULTILINE))
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0]) for i, a in steps if i == "FROM"]
    assert bases
    for base in bases:
        assert "@sha256:" in base or re.search(r":\d+\.\d+\.\d+", base), f"{base}: pin an exact tag or a digest"
        assert not base.endswith(":latest")
        assert base.startswith("python:3.11."), base


def test_runs_as_a_non_root_user() -> None:
    steps = instructions()
    final = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    users = [(i, args) for i, (name, args) in enumerate(steps) if name == "USER" and i > final]
    assert users, "the runtime stage sets no USER"
    index, user = users[-1]
    assert user.split(":")[0] not in {"root", "0"}, user
    starts = [i for i, (name, _) in enumerate(steps) if name in {"CMD", "ENTRYPOINT"}]
    assert starts and all(i > index for i in starts), "USER comes before CMD/ENTRYPOINT"


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    steps = instructions()
    copy_lock = next(i for i, (n, a) in enumerate(steps) if n == "COPY" and "requirements.lock" in a)
    installs = [i for i, (n, a) in enumerate(steps) if n == "RUN" and "pip install" in a]
    copy_source = [i for i, (n, a) in enumerate(steps) if n == "COPY" and re.match(r"(--\S+\s+)*\.\s", a)]
    assert installs and copy_source
    assert copy_lock < min(installs) and max(installs) < min(copy_source)
    assert "pyproject.toml" in steps[copy_lock][1]


def test_torch_is_the_cpu_build_pinned_by_the_lock() -> None:
    lock = (REPO_ROOT / "requirements.lock").read_text()
    assert re.search(r"^torch==\d+\.\d+\.\d+$", lock, flags=re.MULTILINE)
    installs = [a for n, a in instructions() if n == "RUN" and "pip install" in a]
    for command in re.split(r"&&", " ".join(installs)):
        if "pip install" in command:
            assert "-c requirements.lock" in command, command
    torch = next(c for c in " ".join(installs).split("&&") if re.search(r"\btorch\b", c) and "pip install" in c)
    assert "download.pytorch.org/whl/cpu" in torch
    assert not re.search(r"torch[=<>~]", torch), "the lock pins torch's version, not the Dockerfile"


def test_runtime_environment_and_labels() -> None:
    text = DOCKERFILE.read_text()
    for variable in ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1"):
        assert variable in text, variable
    for label in ("title", "revision", "licenses", "description"):
        assert f"org.opencontainers.image.{label}=" in text, label
    exposed = {int(p) for n, a in instructions() if n == "EXPOSE" for p in a.split()}
    assert exposed >= RAY_PORTS | {5000, 7860, 9102}
    assert "ARG GIT_COMMIT" in text and "RUN" in text


def test_dockerignore_keeps_state_and_secrets_out() -> None:
    entries = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.strip()}
    assert {".venv", ".state", ".git", ".env", ".secrets"} <= entries
    assert "data" not in entries, "the shipped data set is the default data source"
