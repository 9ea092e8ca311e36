"""The dispatcher's operator commands on this machine's PostgreSQL: `cancel` and what `show` tells."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator

import pytest

from cluster.sandbox import AMQP_URL, run_cli, temporary_database
from core.audit import Actor
from services.training_jobs.models import JobRecord, JobSpec
from services.training_jobs.store import JobStore


@pytest.fixture
def dsn() -> Iterator[str]:
    with temporary_database("dispatcher_cli_test") as name:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"


def _env(dsn: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": dsn, "AMQP_URL": AMQP_URL}


def _jobs(dsn: str, creator: Actor, finished: bool) -> list[JobRecord]:
    """A queued job (never published: no dispatcher runs here) and, if asked, one that succeeded."""

    async def make(store: JobStore) -> list[JobRecord]:
        queued, _ = await store.create(JobSpec(), 3, None, publish_grace_s=3600, actor=creator)
        made = [queued]
        if finished:
            done, _ = await store.create(JobSpec(), 3, None, publish_grace_s=3600, actor=creator)
            assert await store.claim(done.id, "d") is not None
            assert await store.succeed(done.id, 1, {"run_id": "r", "model_version": "1"})
            made.append(done)
        return made

    return asyncio.run(JobStore(dsn, retry_for_s=10).run_once(make))


def test_operator_cancels_a_job_and_show_names_who_started_and_who_cancelled_it(dsn):
    creator = Actor(kind="api_key", key_id="3fa2c1d0e9b8", name="ci")
    queued, done = _jobs(dsn, creator, finished=True)
    env = _env(dsn)

    cancelled = run_cli("services.dispatcher", "cancel", str(queued.id), env=env, timeout=120)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"job {queued.id} cancelled"
    audit = [json.loads(line) for line in cancelled.stderr.splitlines() if line.startswith("{")]
    assert [a["actor_kind"] for a in audit] == ["operator"] and audit[0]["job_id"] == str(queued.id)
    again = run_cli("services.dispatcher", "cancel", str(queued.id), env=env, timeout=120)
    assert again.returncode == 0 and "already cancelled" in again.stdout

    shown = run_cli("services.dispatcher", "show", str(queued.id), env=env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    detail = json.loads(shown.stdout)
    assert detail["state"] == "cancelled" and Actor.model_validate(detail["created_by"]) == creator
    assert [(e["state"], e["actor"]["kind"]) for e in detail["events"]] == [
        ("queued", "api_key"),
        ("cancelled", "operator"),
    ]

    finished = run_cli("services.dispatcher", "cancel", str(done.id), env=env, timeout=120)
    assert finished.returncode == 1 and "already ended (succeeded)" in finished.stderr
    unknown = run_cli("services.dispatcher", "cancel", "00000000-0000-0000-0000-000000000000", env=env, timeout=120)
    assert unknown.returncode == 1 and "no training job" in unknown.stderr
