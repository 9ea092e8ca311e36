""".env.example documents every setting, and only settings, with their true defaults.

A variable counts as documented when a line starts with `NAME=` or `# NAME=`. The file has two
parts: the platform's settings (`core.settings.environment_variables()`), and after the
"Compose only" heading the variables only compose.yaml reads (an explicit allow-list here, so a
typo or a removed setting cannot hide there)."""

from __future__ import annotations

import re
from operator import attrgetter

import pytest

from core.settings import REPO_ROOT, Settings, environment_variables

ENV_EXAMPLE = REPO_ROOT / ".env.example"
COMPOSE_ONLY_HEADING = "# == Compose only =="
# What compose.yaml interpolates besides platform settings (tests/unit/test_compose.py checks
# that every variable compose reads is documented).
COMPOSE_ONLY = frozenset(
    {
        "GRAFANA_ADMIN_PASSWORD",
        "GRAFANA_ROOT_URL",
        "HTTPS_PORT",
        "HTTP_PORT",
        "IMAGE_TAG",
        "LETSENCRYPT_EMAIL",
        "LETSENCRYPT_STAGING",
        "MINIO_ROOT_PASSWORD",
        "MINIO_ROOT_USER",
        "NGINX_RELOAD_INTERVAL_S",
        "POSTGRES_PASSWORD",
        "POSTGRES_USER",
        "RABBITMQ_PASSWORD",
        "RABBITMQ_USER",
        "RAY_HEAD_MEMORY",
        "RAY_HEAD_NUM_CPUS",
        "RAY_SHM_SIZE",
        "RAY_WORKER_MEMORY",
        "RAY_WORKER_NUM_CPUS",
        "TLS_DOMAIN",
    }
)
ASSIGNMENT = re.compile(r"^#?\s*(?P<name>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def assignments(lines: list[str]) -> list[tuple[str, str]]:
    """(name, value) of every `NAME=value` or `# NAME=value` line; an inline `  # ...` comment is
    not part of the value."""
    found = []
    for line in lines:
        match = ASSIGNMENT.match(line)
        if match is not None:
            value = re.split(r"\s+#", match["value"], maxsplit=1)[0].strip()
            found.append((match["name"], value))
    return found


def parts() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    lines = ENV_EXAMPLE.read_text(encoding="utf-8").splitlines()
    assert lines.count(COMPOSE_ONLY_HEADING) == 1, f".env.example needs one {COMPOSE_ONLY_HEADING!r} line"
    split = lines.index(COMPOSE_ONLY_HEADING)
    return assignments(lines[:split]), assignments(lines[split:])


SETTINGS = {name: path for name, path, _ in environment_variables()}


def test_every_setting_is_documented_and_nothing_else() -> None:
    platform, _ = parts()
    documented = {name for name, _ in platform}
    missing = set(SETTINGS) - documented
    assert not missing, f"settings missing from .env.example: {sorted(missing)}"
    unknown = documented - set(SETTINGS)
    assert not unknown, f".env.example names variables that are no setting: {sorted(unknown)}"


def test_compose_only_part_is_the_allow_list() -> None:
    _, compose_only = parts()
    documented = {name for name, _ in compose_only}
    assert documented == COMPOSE_ONLY, (sorted(documented - COMPOSE_ONLY), sorted(COMPOSE_ONLY - documented))
    assert not COMPOSE_ONLY & set(SETTINGS), "a setting belongs to the settings part"


def test_each_variable_is_documented_once() -> None:
    platform, compose_only = parts()
    names = [name for name, _ in platform + compose_only]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"documented more than once: {duplicates}"


def test_regex_reads_commented_and_plain_lines() -> None:
    lines = ["# A_B=1  # why", "C=", "#   D=x", "# not an assignment: E=1", "lower=1"]
    assert assignments(lines) == [("A_B", "1"), ("C", ""), ("D", "x")]


@pytest.fixture
def bare_environment(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SETTINGS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_shown_values_are_the_defaults(bare_environment: pytest.MonkeyPatch) -> None:
    """`# NAME=value` shows the default. An empty value stands for "unset" or a derived default;
    a setting that is unset by default may show an example instead."""
    defaults = Settings(_env_file=None)
    platform, _ = parts()
    wrong = []
    for name, value in platform:
        default = attrgetter(SETTINGS[name])(defaults)
        if value == "" or default is None:
            continue
        bare_environment.setenv(name, value)
        shown = attrgetter(SETTINGS[name])(Settings(_env_file=None))
        bare_environment.delenv(name)
        if shown != default:
            wrong.append(f"{name}={value} (default {default!r})")
    assert not wrong, f".env.example shows values that are not the defaults: {wrong}"
