"""The key table in PostgreSQL, through the CLI an operator uses and the refresher a replica runs:
digests only, revocation that sticks, and the last known keys kept while the database is gone."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import psycopg
import pytest

from cluster.sandbox import PG_ADMIN_DSN, temporary_database
from core.keys import MIGRATIONS, ApiKeyTable, KeyRefresher, KeyStore, Scope, bootstrap_principals, hash_api_key
from core.settings import REPO_ROOT


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("keys_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


def cli(dsn: str, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
    """`python -m cluster keys ...` as an operator runs it, against `dsn`."""
    env = {**os.environ, "DATABASE_URL": dsn}
    done = subprocess.run(
        [sys.executable, "-m", "cluster", "keys", *args],
        cwd=REPO_ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout, done.stderr


def rows(dsn: str) -> list[tuple[str, ...]]:
    with psycopg.connect(dsn) as conn:
        return [tuple(str(v) for v in row) for row in conn.execute("SELECT * FROM api_keys ORDER BY name")]


def test_the_cli_stores_digests_and_shows_a_key_once(dsn: str) -> None:
    code, key, _ = cli(dsn, "add", "alice", "--scopes", "predict,feedback")
    assert code == 0
    key = key.strip()
    stored = rows(dsn)
    assert len(stored) == 1 and stored[0][:2] == ("alice", hash_api_key(key))
    assert not any(key in value for value in stored[0])
    code, listed, _ = cli(dsn, "list")
    assert code == 0 and "alice" in listed and "predict,feedback" in listed
    assert hash_api_key(key)[:12] in listed, "the key id (a digest prefix) names the key in records"
    assert key not in listed and hash_api_key(key) not in listed
    # Names are never reused, and the same key cannot hide under a second name.
    assert cli(dsn, "add", "alice", "--scopes", "predict")[0] == 1
    code, _, err = cli(dsn, "add", "bob", "--stdin", "--scopes", "predict", stdin=key + "\n")
    assert code == 1 and "stored already, as 'alice'" in err


def test_revocation_is_recorded_and_idempotent(dsn: str) -> None:
    assert cli(dsn, "add", "alice", "--scopes", "train")[0] == 0
    assert cli(dsn, "revoke", "alice")[0] == 0
    first = rows(dsn)[0][3]
    assert first != "None"
    assert cli(dsn, "revoke", "alice")[0] == 0
    assert rows(dsn)[0][3] == first, "a second revoke keeps the first time"
    code, _, err = cli(dsn, "revoke", "nobody")
    assert code == 1 and "no key named 'nobody'" in err


def test_the_refresher_follows_the_table_and_survives_its_loss(dsn: str) -> None:
    """A replica's view: keys from API_KEYS, keys added and revoked in the table, and what it keeps
    when the database disappears (dropped here: the real failure, without stopping the server
    other tests share)."""
    boot_key = "bootstrap-key-from-api-keys"
    bootstrap = bootstrap_principals([hash_api_key(boot_key)])
    store = KeyStore(bootstrap)
    table = ApiKeyTable(dsn, retry_for_s=0.5, pool_timeout_s=1.0)
    refresher = KeyRefresher(table, store, bootstrap, interval_s=60)

    async def scenario() -> None:
        await table.open()
        try:
            assert await refresher.refresh()  # creates the table
            _, added, _ = cli(dsn, "add", "carol", "--scopes", "predict", "--models", "adult-income,other")
            carol = added.strip()
            assert not store.verify(carol)
            assert await refresher.refresh() and store.verify(carol) and store.verify(boot_key)
            principal = store.verify(carol)
            assert principal is not None and principal.scopes == {Scope.PREDICT} and not principal.admin
            assert principal.models == frozenset({"adult-income", "other"}) and principal.name == "carol"
            assert store.verify(boot_key).admin  # type: ignore[union-attr]
            # The bootstrap key brought under the table narrows it to the table's scopes...
            assert cli(dsn, "add", "bootstrap", "--stdin", "--scopes", "feedback", stdin=boot_key)[0] == 0
            assert await refresher.refresh() and store.verify(boot_key).scopes == {Scope.FEEDBACK}  # type: ignore[union-attr]
            # ...and revoked there, it is refused though API_KEYS lists it.
            assert cli(dsn, "revoke", "bootstrap")[0] == 0
            assert await refresher.refresh() and not store.verify(boot_key) and store.verify(carol)
            name = psycopg.conninfo.conninfo_to_dict(dsn)["dbname"]
            with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
            assert not await refresher.refresh()
            assert store.verify(carol) and not store.verify(boot_key), "the last known set stays"
        finally:
            await table.close()

    asyncio.run(scenario())


def test_keys_added_before_scopes_keep_what_they_could_do(dsn: str) -> None:
    """A table from before scopes: its keys become predict, feedback and train (not admin)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE api_keys_schema (version integer NOT NULL)")
        conn.execute(MIGRATIONS[0])
        conn.execute("INSERT INTO api_keys_schema VALUES (1)")
        conn.execute("INSERT INTO api_keys (name, key_sha256) VALUES ('old', %s)", (hash_api_key("old-key"),))
    table = ApiKeyTable(dsn, retry_for_s=0.5, pool_timeout_s=1.0)

    async def migrated() -> frozenset[Scope]:
        await table.open()
        try:
            await table.migrate()
            return (await table.keys()).active[hash_api_key("old-key")].scopes
        finally:
            await table.close()

    assert asyncio.run(migrated()) == {Scope.PREDICT, Scope.FEEDBACK, Scope.TRAIN}
    # New rows must say what they may do: the column has no default any more.
    with psycopg.connect(dsn) as conn, pytest.raises(psycopg.errors.NotNullViolation):
        conn.execute("INSERT INTO api_keys (name, key_sha256) VALUES ('new', %s)", (hash_api_key("new-key"),))
