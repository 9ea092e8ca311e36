"""The key store's rules without PostgreSQL: which digests a replica accepts, swapping them while
requests come in, and what a replica does when the key table cannot be read."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cluster.__main__ import app as cli
from cluster.sandbox import free_port
from core.keys import (
    ApiKeyTable,
    KeyRefresher,
    KeyStore,
    Principal,
    Scope,
    TableKeys,
    accepted_principals,
    bootstrap_principals,
    hash_api_key,
    key_id_of,
    new_api_key,
    parse_scopes,
    valid_key_name,
)
from core.settings import get_settings
from serve_apps.auth import authenticate

BOOT, ADDED, REVOKED = hash_api_key("boot-key"), hash_api_key("added-key"), hash_api_key("revoked-key")
BOOTSTRAP = bootstrap_principals([BOOT])


def principal(digest: str, name: str, *scopes: Scope) -> Principal:
    return Principal(key_id_of(digest), name, frozenset(scopes or {Scope.PREDICT}))


def test_table_keys_join_api_keys_and_revocations_win() -> None:
    table = TableKeys(active={ADDED: principal(ADDED, "added")}, revoked=frozenset({REVOKED}))
    assert set(accepted_principals(BOOTSTRAP, table)) == {BOOT, ADDED}
    # A key from API_KEYS revoked in the table is refused, though API_KEYS still lists it.
    both = bootstrap_principals([BOOT, REVOKED])
    assert set(accepted_principals(both, table)) == {BOOT, ADDED}
    assert accepted_principals(bootstrap_principals([REVOKED]), TableKeys({}, frozenset({REVOKED}))) == {}


def test_the_table_narrows_a_key_of_api_keys() -> None:
    narrowed = principal(BOOT, "boot-as-reader", Scope.PREDICT)
    accepted = accepted_principals(BOOTSTRAP, TableKeys(active={BOOT: narrowed}, revoked=frozenset()))
    assert accepted[BOOT] == narrowed and not accepted[BOOT].admin


def test_scopes_parse_and_unknown_ones_are_named() -> None:
    assert parse_scopes("predict, feedback") == {Scope.PREDICT, Scope.FEEDBACK}
    with pytest.raises(ValueError, match=r"unknown scope.*everything"):
        parse_scopes("predict,everything")
    with pytest.raises(ValueError, match="no scopes"):
        parse_scopes(" , ")


@pytest.fixture
def store() -> KeyStore:
    return KeyStore(BOOTSTRAP)


@pytest.fixture
def client(store: KeyStore) -> TestClient:
    app = FastAPI()
    app.state.key_store = store

    @app.get("/private", dependencies=[Depends(authenticate)])
    async def private() -> dict[str, str]:
        return {"ok": "yes"}

    return TestClient(app)


def test_a_replaced_set_takes_effect_on_the_next_request(store: KeyStore, client: TestClient) -> None:
    assert client.get("/private", headers={"X-API-Key": "added-key"}).status_code == 401
    store.replace({**BOOTSTRAP, ADDED: principal(ADDED, "added")})
    assert client.get("/private", headers={"X-API-Key": "added-key"}).status_code == 200
    store.replace({ADDED: principal(ADDED, "added")})
    assert client.get("/private", headers={"Authorization": "Bearer boot-key"}).status_code == 401


def test_every_key_revoked_refuses_everyone(store: KeyStore, client: TestClient) -> None:
    store.replace({})
    for headers in ({"X-API-Key": "boot-key"}, {"Authorization": "Bearer "}, {}):
        assert client.get("/private", headers=headers).status_code == 401


def test_an_unreachable_database_keeps_the_last_set(store: KeyStore, caplog: pytest.LogCaptureFixture) -> None:
    store.replace({**BOOTSTRAP, ADDED: principal(ADDED, "added")})
    table = ApiKeyTable(f"postgresql://postgres@127.0.0.1:{free_port()}/keys", retry_for_s=0.1, pool_timeout_s=0.2)
    refresher = KeyRefresher(table, store, BOOTSTRAP, interval_s=60)

    async def twice() -> list[bool]:
        await table.open()
        try:
            return [await refresher.refresh(), await refresher.refresh()]
        finally:
            await table.close()

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert asyncio.run(twice()) == [False, False]
    assert store.verify("added-key") and store.verify("boot-key") and store.verify("revoked-key") is None
    warnings = [r for r in caplog.records if r.name == "ray.serve" and "API keys not refreshed" in r.getMessage()]
    assert len(warnings) == 1, "one warning when the database goes away, not one per interval"


@pytest.mark.parametrize("name", ["alice", "ci.deploy-2025_01", "a" * 64])
def test_valid_key_names(name: str) -> None:
    assert valid_key_name(name)


@pytest.mark.parametrize("name", ["", "with space", "-leading-dash", "a" * 65, "x;drop", "ünï"])
def test_invalid_key_names(name: str) -> None:
    assert not valid_key_name(name)


def test_generated_keys_are_long_and_distinct() -> None:
    keys = {new_api_key() for _ in range(100)}
    assert len(keys) == 100 and all(len(k) >= 43 for k in keys)


@pytest.fixture
def no_database(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("DATABASE_URL", "")
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("args", [["add", "alice", "--scopes", "predict"], ["revoke", "alice"], ["list"]])
def test_cli_names_the_missing_database(no_database: None, args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["keys", *args])
    assert result.exit_code == 2
    assert "DATABASE_URL is not set" in result.output


def test_cli_refuses_a_bad_name_before_anything_else(no_database: None) -> None:
    result = CliRunner().invoke(cli, ["keys", "add", "bad name", "--scopes", "predict"])
    assert result.exit_code == 2 and "invalid name" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scopes", "predict,root"], "unknown scope(s) root"),
        (["--scopes", "predict", "--models", "bad name"], "--models"),
    ],
)
def test_cli_refuses_bad_scopes_and_models_before_anything_else(
    no_database: None, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(cli, ["keys", "add", "alice", *args])
    assert result.exit_code == 2 and message in result.output


def test_cli_requires_the_scopes_of_a_new_key(no_database: None) -> None:
    result = CliRunner().invoke(cli, ["keys", "add", "alice"])
    assert result.exit_code == 2 and "--scopes" in result.output
