"""`python -m services.dispatcher`: run a dispatcher; `list`, `show`, `requeue`, `cancel` for operators."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Awaitable, Callable
from typing import TypeVar
from uuid import UUID

import typer

from core.audit import Actor
from core.logs import configure_logging
from core.settings import Settings, get_settings
from core.telemetry import init_tracing, shutdown_tracing
from services.dispatcher.core import Dispatcher, dispatcher_name
from services.dispatcher.ray_jobs import RayJobs
from services.training_jobs.broker import Publisher, Topology, connect
from services.training_jobs.models import JobState, actor_log_fields
from services.training_jobs.store import JobFinishedError, JobNotFoundError, JobStore

T = TypeVar("T")
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=False)
log = logging.getLogger(__name__)


def _require_enabled(settings: Settings) -> tuple[str, str]:
    if settings.database.url is None or settings.amqp.url is None:
        typer.echo(
            "dispatcher: set DATABASE_URL (PostgreSQL) and AMQP_URL (RabbitMQ) in .env or the environment", err=True
        )
        raise typer.Exit(2)
    return settings.database.url.get_secret_value(), settings.amqp.url.get_secret_value()


def _audit(settings: Settings, message: str, job_id: UUID, actor: Actor) -> None:
    """One JSON line on stderr naming the operator, as the services log it; stdout stays for people."""
    configure_logging("dispatcher-cli", settings.log_level, with_ray=False)
    log.info(message, extra={"job_id": str(job_id), **actor_log_fields(actor)})


def _with_store(fn: Callable[[JobStore], Awaitable[T]]) -> T:
    dsn, _ = _require_enabled(get_settings())

    return asyncio.run(JobStore(dsn, retry_for_s=10).run_once(fn))


@app.callback(invoke_without_command=True)
def main(ctx: typer.Context) -> None:
    """Consume training requests and run them on the Ray cluster (the default command)."""
    if ctx.invoked_subcommand is None:
        run()


@app.command()
def run() -> None:
    """Run a dispatcher until SIGTERM / SIGINT. Several may run at once."""
    settings = get_settings()
    configure_logging("dispatcher", settings.log_level)
    # The Jobs SDK logs every file of every working-dir upload at INFO.
    logging.getLogger("ray").setLevel(logging.WARNING)
    init_tracing("dispatcher", settings)
    dsn, amqp = _require_enabled(settings)
    store = JobStore(dsn)
    publisher = Publisher(amqp, Topology.from_settings(settings), f"dispatcher-relay {dispatcher_name()}")
    ray_jobs = RayJobs(settings.ray.dashboard_url, settings.ray.auth_headers())
    dispatcher = Dispatcher(settings, store, publisher, ray_jobs)
    dispatcher.metrics.serve(settings.dispatcher.host, settings.dispatcher.metrics_port)

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await dispatcher.run(stop)

    try:
        asyncio.run(serve())
    finally:
        shutdown_tracing()


@app.command("list")
def list_jobs(
    state: JobState | None = typer.Option(None, help="only jobs in this state"),
    limit: int = typer.Option(20, min=1, max=1000),
) -> None:
    """The most recent training jobs."""
    jobs = _with_store(lambda store: store.list(state, limit))
    typer.echo(f"{'id':36}  {'kind':13}  {'state':13}  {'att':>3}  {'version':>7}  {'created':19}  last error")
    for job in jobs:
        typer.echo(
            f"{job.id!s:36}  {job.kind:13}  {job.state.value:13}  {job.attempts:>3}  {job.model_version or '-':>7}  "
            f"{job.created_at:%Y-%m-%d %H:%M:%S}  {(job.last_error or '')[:60]}"
        )


@app.command()
def show(job_id: UUID) -> None:
    """One job with its history, as JSON."""
    detail = _with_store(lambda store: store.detail(job_id))
    if detail is None:
        typer.echo(f"no training job {job_id}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(detail.model_dump(mode="json"), indent=2))


@app.command()
def requeue(job_id: UUID) -> None:
    """Give a dead-lettered (or failed) job a fresh set of attempts and remove its copies from
    the dead-letter queue."""
    settings = get_settings()
    _, amqp = _require_enabled(settings)
    topology = Topology.from_settings(settings)

    actor = Actor.operator()

    async def go(store: JobStore) -> None:
        job = await store.requeue(job_id, settings.dispatcher.max_attempts, actor)
        if job is None:
            current = await store.get(job_id)
            state = current.state.value if current else "not found"
            typer.echo(f"job {job_id} is {state}; only dead_lettered or failed jobs can be re-queued", err=True)
            raise typer.Exit(1)
        removed = await drain_dead_letters(amqp, topology, job_id)
        publisher = Publisher(amqp, topology, "requeue")
        try:
            await publisher.publish(job_id, await store.traceparent(job_id))
            await store.mark_published(job_id)
        finally:
            await publisher.close()
        _audit(settings, f"training job {job_id} re-queued by {actor.label()}", job_id, actor)
        typer.echo(f"job {job_id} re-queued ({removed} dead-letter message(s) removed)")

    _with_store(go)


@app.command()
def cancel(job_id: UUID) -> None:
    """Cancel a queued or running job: it ends as cancelled at once, and the dispatcher stops its
    Ray job. A cancelled job stays cancelled; a job that ended otherwise cannot be cancelled."""
    settings = get_settings()
    actor = Actor.operator()

    async def go(store: JobStore) -> None:
        try:
            job, cancelled = await store.cancel(job_id, actor, owner_key_id=None)
        except JobNotFoundError:
            typer.echo(f"no training job {job_id}", err=True)
            raise typer.Exit(1) from None
        except JobFinishedError as exc:
            typer.echo(f"job {job_id} already ended ({exc.record.state.value}); nothing to cancel", err=True)
            raise typer.Exit(1) from None
        if not cancelled:
            typer.echo(f"job {job_id} was already cancelled")
            return
        _audit(settings, f"training job {job_id} cancelled by {actor.label()}", job_id, actor)
        typer.echo(f"job {job_id} {job.state.value}")

    _with_store(go)


async def drain_dead_letters(amqp_url: str, topology: Topology, job_id: UUID) -> int:
    """Remove the job's messages from the dead-letter queue, leaving the others in place: the
    others stay unacknowledged while scanning (so `get` moves past them), then go back."""
    connection = await connect(amqp_url, "requeue")
    removed = 0
    try:
        channel = await connection.channel()
        queue = await channel.get_queue(topology.dead_letter_queue, ensure=True)
        held = []
        while (message := await queue.get(no_ack=False, fail=False, timeout=10)) is not None:
            if (message.headers or {}).get("x-job-id") == str(job_id):
                await message.ack()
                removed += 1
            else:
                held.append(message)
        for message in held:
            await message.nack(requeue=True)
    finally:
        await connection.close()
    return removed


if __name__ == "__main__":
    app()
