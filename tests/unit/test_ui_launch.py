"""The UI's settings, its login policy, its key from `cluster up`, and serving under a prefix."""

import asyncio
import logging
import subprocess
import sys

import pytest

from cluster import apps
from cluster.apps import ui_environment
from core.settings import REPO_ROOT, Settings, environment_variables
from ui.launch import UiConfigError, login_credentials
from ui.proxy import ForwardedPrefixMiddleware, forwarded_prefix


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch):
    for name, _, _ in environment_variables():
        monkeypatch.delenv(name, raising=False)


def test_defaults():
    settings = Settings(_env_file=None)
    assert settings.ui.url == "http://127.0.0.1:7860"
    assert settings.resolved_ui_api_url == settings.serve.url
    assert settings.ui.root_path == "" and settings.ui.api_key is None and settings.ui.username == "admin"
    assert not settings.ui_login_required


def test_blank_secrets_are_unset_and_wildcard_binds_are_reached_over_loopback(monkeypatch):
    monkeypatch.setenv("UI_PASSWORD", "")
    monkeypatch.setenv("UI_API_KEY", " ")
    monkeypatch.setenv("UI_HOST", "0.0.0.0")
    monkeypatch.setenv("UI_API_URL", "https://edge:8443/")
    settings = Settings(_env_file=None)
    assert settings.ui.password is None and settings.ui.api_key is None
    assert settings.ui.url == "http://127.0.0.1:7860" and settings.resolved_ui_api_url == "https://edge:8443"


def test_no_login_in_local_development():
    assert login_credentials(Settings(_env_file=None)) is None


def test_login_whenever_a_password_is_set():
    settings = Settings(_env_file=None, ui={"password": "pw", "username": "ops"})
    assert login_credentials(settings) == [("ops", "pw")]
    assert "pw" not in repr(settings)


def test_outside_development_a_password_is_required():
    settings = Settings(_env_file=None, deployment_environment="production")
    assert settings.ui_login_required
    with pytest.raises(UiConfigError, match="DEPLOYMENT_ENVIRONMENT=production needs a login; set UI_PASSWORD"):
        login_credentials(settings)
    assert login_credentials(Settings(_env_file=None, deployment_environment="production", ui={"password": "x"}))


def test_the_ui_refuses_to_start_without_a_login_in_production(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DEPLOYMENT_ENVIRONMENT": "production", "STATE_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "ui"], cwd=tmp_path, env={**env, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "ui: DEPLOYMENT_ENVIRONMENT=production needs a login; set UI_PASSWORD (and UI_USERNAME, default admin), "
        "or DEPLOYMENT_ENVIRONMENT=development on a private machine"
    ]


def test_without_a_database_cluster_up_gives_the_ui_the_first_api_key_unless_it_has_its_own():
    env = {"X": "1"}
    assert ui_environment(Settings(_env_file=None, api={"keys": "k1,k2"}), env) == {"X": "1", "UI_API_KEY": "k1"}
    assert ui_environment(Settings(_env_file=None, api={"keys": "k1"}, ui={"api_key": "own"}), env) == env


# `cluster up` with DATABASE_URL (tests/integration/test_ui.py has the key it registers there) -----

ADMIN_KEY = "admin-key-from-api-keys"
# Nothing listens on port 1: the database is away.
NO_DATABASE = "postgresql://postgres@127.0.0.1:1/nowhere"


def test_without_the_database_the_ui_runs_with_an_admin_key_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(apps, "UI_KEY_DB_WAIT_S", 0.5)
    settings = Settings(_env_file=None, api={"keys": ADMIN_KEY}, database={"url": NO_DATABASE}, state_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="cluster"):
        assert ui_environment(settings, {"X": "1"}) == {"X": "1", "UI_API_KEY": ADMIN_KEY}
    warnings = [r.getMessage() for r in caplog.records if r.name == "cluster"]
    assert warnings[0].startswith("ui: could not register an API key of its own (PoolTimeout: ")
    assert warnings[-1] == "ui: runs with the first of API_KEYS, an admin key, until `cluster up` can register its own"
    assert not (tmp_path / "ui.key").exists()


def test_a_ui_key_that_is_set_is_used_as_it_is_and_the_database_is_not_asked(tmp_path, caplog):
    settings = Settings(
        _env_file=None,
        api={"keys": ADMIN_KEY},
        database={"url": NO_DATABASE},
        state_dir=tmp_path,
        ui={"api_key": "own"},
    )
    with caplog.at_level(logging.WARNING):
        assert ui_environment(settings, {"X": "1"}) == {"X": "1"}
    assert caplog.records == [] and not (tmp_path / "ui.key").exists()


@pytest.mark.parametrize(
    ("value", "prefix"),
    [(b"/ui", "/ui"), (b"/ui/", "/ui"), (b"/a/b, /c", "/a/b"), (b"//evil.example", None), (b"https://x/ui", None)],
)
def test_forwarded_prefix(value, prefix):
    assert forwarded_prefix([(b"X-Forwarded-Prefix", value)]) == prefix
    assert forwarded_prefix([(b"host", b"x")]) is None


def test_middleware_sets_the_root_path_only_from_the_header():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope.get("root_path"))

    async def receive():
        return {}

    async def send(message):
        return None

    middleware = ForwardedPrefixMiddleware(app)
    for scope in (
        {"type": "http", "headers": [(b"x-forwarded-prefix", b"/ui")]},
        {"type": "http", "headers": []},
        {"type": "http", "root_path": "/mnt", "headers": [(b"x-forwarded-prefix", b"/ui")]},  # set by a mount
    ):
        asyncio.run(middleware(scope, receive, send))
    assert seen == ["/ui", None, "/mnt"]
