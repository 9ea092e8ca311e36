"""`python -m cluster keys add|revoke|list`: the inference API's keys in PostgreSQL (DATABASE_URL).

Only a key's SHA-256 digest is stored, with its scopes (predict, feedback, train, admin) and the
models it may use; `add` prints the key once and it cannot be shown again. Every ingress replica
picks a change up within API_KEY_REFRESH_S, without a restart. Keys in API_KEYS are admin keys.
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

import typer

from core.database import TRANSIENT_DB_ERRORS
from core.keys import (
    ApiKeyRecord,
    ApiKeyTable,
    KeyAlreadyStoredError,
    KeyNameTakenError,
    Scope,
    hash_api_key,
    new_api_key,
    parse_scopes,
    valid_key_name,
)
from core.settings import Settings, get_settings
from jobs.config import MODEL_NAME_PATTERN

T = TypeVar("T")

keys_app = typer.Typer(
    pretty_exceptions_enable=False,
    help="API keys of the inference API, stored hashed in PostgreSQL (DATABASE_URL).",
    no_args_is_help=True,
    add_completion=False,
)


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def _with_table(settings: Settings, op: Callable[[ApiKeyTable], Awaitable[T]]) -> T:
    if settings.database.url is None:
        raise _fail("DATABASE_URL is not set: API keys are stored in the platform's PostgreSQL database", 2)
    dsn = settings.database.url.get_secret_value()

    try:
        return asyncio.run(ApiKeyTable(dsn, retry_for_s=10.0, pool_timeout_s=5.0).run_once(op))
    except TRANSIENT_DB_ERRORS as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise _fail(f"PostgreSQL is not reachable for DATABASE_URL ({first}); nothing changed") from exc


def _models(text: str | None) -> frozenset[str] | None:
    if text is None:
        return None
    names = [part.strip() for part in text.split(",") if part.strip()]
    invalid = [name for name in names if not re.fullmatch(MODEL_NAME_PATTERN, name)]
    if not names or invalid:
        raise _fail(f"--models: {', '.join(invalid) or 'no names'}: give registered model names, comma-separated", 2)
    return frozenset(names)


def _scopes(scopes: frozenset[Scope]) -> str:
    return ",".join(scope.value for scope in Scope if scope in scopes)


def _when(at: datetime | None) -> str:
    return at.astimezone().isoformat(timespec="seconds") if at is not None else "-"


@keys_app.command("add")
def add_command(
    name: str = typer.Argument(help="a name for the key's holder: letters, digits, '.', '_', '-'"),
    scopes_text: str = typer.Option(
        ...,
        "--scopes",
        help="comma-separated: predict, feedback, train (its own jobs), admin (everything)",
    ),
    models_text: str | None = typer.Option(
        None, "--models", help="comma-separated registered model names the key is restricted to (default: every model)"
    ),
    stdin: bool = typer.Option(
        False, "--stdin", help="register the key read from stdin (one of API_KEYS, say) instead of generating one"
    ),
) -> None:
    """Generate a key with the given scopes, store its digest, print the key once."""
    if not valid_key_name(name):
        raise _fail(f"invalid name {name!r}: 1-64 letters, digits, '.', '_' or '-'", 2)
    try:
        scopes = parse_scopes(scopes_text)
    except ValueError as exc:
        raise _fail(f"--scopes: {exc}", 2) from exc
    models = _models(models_text)
    key = sys.stdin.readline().strip() if stdin else new_api_key()
    if not key:
        raise _fail("no key on stdin", 2)
    settings = get_settings()
    try:
        _with_table(settings, lambda table: table.add(name, hash_api_key(key), scopes, models))
    except KeyNameTakenError as exc:
        raise _fail(f"a key named {name!r} exists already (names are never reused; pick another)") from exc
    except KeyAlreadyStoredError as exc:
        raise _fail(f"this key is stored already, as {exc.args[0]!r}") from exc
    refresh = f"the API accepts it within {settings.api.key_refresh_s:g} s"
    if stdin:
        typer.echo(f"registered key {name!r}; {refresh}", err=True)
        return
    typer.echo(f"added key {name!r}; {refresh}. It is shown only this once:", err=True)
    typer.echo(key)


@keys_app.command("revoke")
def revoke_command(name: str = typer.Argument(help="the key's name, as `keys list` shows it")) -> None:
    """Refuse the key from now on (within API_KEY_REFRESH_S), even if it is also in API_KEYS."""
    settings = get_settings()
    record = _with_table(settings, lambda table: table.revoke(name))
    if record is None:
        raise _fail(f"no key named {name!r}")
    typer.echo(f"revoked key {name!r} at {_when(record.revoked_at)}; refused within {settings.api.key_refresh_s:g} s")


@keys_app.command("list")
def list_command() -> None:
    """Every key's name, id, scopes, models, when it was added and when it was revoked. Never a key
    or its digest (the id is a prefix of the digest, as the audit records name the key)."""
    records: list[ApiKeyRecord] = _with_table(get_settings(), lambda table: table.records())
    width = max([len(r.name) for r in records] + [4])
    scopes_width = max([len(_scopes(r.scopes)) for r in records] + [6])
    typer.echo(f"{'name':<{width}}  {'id':<12}  {'scopes':<{scopes_width}}  {'models':<20}  {'created':<25}  revoked")
    for r in records:
        models = ",".join(sorted(r.models)) if r.models is not None else "*"
        typer.echo(
            f"{r.name:<{width}}  {r.key_id:<12}  {_scopes(r.scopes):<{scopes_width}}  {models:<20}  "
            f"{_when(r.created_at):<25}  {_when(r.revoked_at)}"
        )
