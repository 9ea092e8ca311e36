"""The dispatcher of asynchronous training, and the job database and broker it needs."""

from __future__ import annotations

import sys

from cluster.startup import Listener, StartupError, first_line, start_process
from core.settings import Settings


def ensure_jobs_database(settings: Settings) -> None:
    """Create the job database when the server is up but the database is not there yet."""
    import psycopg

    from core.database import plain_dsn

    assert settings.database.url is not None
    dsn = plain_dsn(settings.database.url.get_secret_value())
    try:
        with psycopg.connect(dsn, connect_timeout=5):
            return
    except psycopg.OperationalError as exc:
        missing = "does not exist" in str(exc)
        if not missing:
            raise StartupError(
                f"dispatcher: PostgreSQL not reachable for DATABASE_URL ({first_line(exc)}); "
                "start it or fix DATABASE_URL"
            ) from exc
    info = psycopg.conninfo.conninfo_to_dict(dsn)
    name = str(info.get("dbname"))
    admin = psycopg.conninfo.make_conninfo(dsn, dbname="postgres")
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(psycopg.sql.Identifier(name)))
    except psycopg.errors.DuplicateDatabase:
        pass  # created concurrently
    except psycopg.Error as exc:
        raise StartupError(f"dispatcher: cannot create database {name!r} ({first_line(exc)})") from exc


def check_broker(settings: Settings) -> None:
    import asyncio

    from services.training_jobs.broker import connect

    assert settings.amqp.url is not None
    url = settings.amqp.url.get_secret_value()

    async def probe() -> None:
        connection = await asyncio.wait_for(connect(url, "cluster up"), 10)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as exc:
        raise StartupError(
            f"dispatcher: RabbitMQ not reachable for AMQP_URL ({type(exc).__name__}: {first_line(exc)}); "
            "start it or fix AMQP_URL"
        ) from exc


def check_dependencies(settings: Settings) -> None:
    ensure_jobs_database(settings)
    check_broker(settings)


def start_dispatcher(settings: Settings, env: dict[str, str]) -> str:
    listener = Listener(settings.dispatcher.host, settings.dispatcher.metrics_port, "DISPATCHER_METRICS_PORT")
    argv = [sys.executable, "-m", "services.dispatcher", "run"]
    return start_process(settings, "dispatcher", argv, env, f"{settings.dispatcher.url}/metrics", listener)
