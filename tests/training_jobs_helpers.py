"""Helpers for tests of asynchronous training: the API, the job records, the queues."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import aio_pika
import httpx

from cluster.sandbox import AMQP_URL, Stack, run_cli
from core.health import wait_until

TERMINAL = {"succeeded", "failed", "dead_lettered", "cancelled", "timed_out"}
QUICK = {"train.epochs": 1, "train.patience": 1}


def add_key(stack: Stack, prefix: str, scopes: str) -> dict[str, str]:
    """A new key with `scopes`, as an operator adds it; returned once the API accepts it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    added = run_cli("cluster", "keys", "add", name, "--scopes", scopes, env=stack.env, timeout=60)
    assert added.returncode == 0, added.stderr
    headers = {"Authorization": f"Bearer {added.stdout.strip()}"}

    def known() -> bool:
        return stack.http.get("/v1/training-jobs", headers=headers, timeout=30).status_code != 401

    assert wait_until(known, 3 * stack.settings.api.key_refresh_s + 5), "the new key was not picked up"
    return headers


def post_job(stack: Stack, body: dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
    return stack.http.post(
        "/v1/training-jobs",
        json=body,
        headers={**stack.auth, **(headers or {})},
        timeout=30,
    )


def get_job(stack: Stack, job_id: str) -> dict[str, Any]:
    response = stack.http.get(f"/v1/training-jobs/{job_id}", headers=stack.auth, timeout=30)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def wait_job(stack: Stack, job_id: str, states: set[str], timeout_s: float = 600) -> dict[str, Any]:
    """Poll the API until the job reaches one of `states`; a terminal state not asked for fails."""
    deadline = time.monotonic() + timeout_s
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            job = get_job(stack, job_id)
        except (httpx.HTTPError, AssertionError):
            time.sleep(1)  # the API may be briefly unable to reach the job store during a fault test
            continue
        if job["state"] in states:
            return job
        assert job["state"] not in TERMINAL - states, job
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout_s}s: {job}")


def dead_letters(queue: str) -> list[dict[str, Any]]:
    """Headers of every message in the dead-letter queue, leaving them in place."""

    async def read() -> list[dict[str, Any]]:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel()
            dlq = await channel.get_queue(queue, ensure=True)
            held = []
            while (message := await dlq.get(no_ack=False, fail=False, timeout=10)) is not None:
                held.append(message)
            found = [{**dict(m.headers or {}), "body": m.body} for m in held]
            for message in held:
                await message.nack(requeue=True)
            return found

    return asyncio.run(read())


def publish_raw(exchange: str, body: bytes) -> None:
    async def send() -> None:
        connection = await aio_pika.connect(AMQP_URL)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            target = await channel.get_exchange(exchange)
            await target.publish(aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT), "train")

    asyncio.run(send())
