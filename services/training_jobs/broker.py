"""RabbitMQ topology and messages for training requests.

A message only says "job <id> is due"; the job itself lives in PostgreSQL. So a duplicate or a
stale message is harmless (the dispatcher checks the row), and the dead-letter queue keeps the
reason a request could not run next to the request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import aio_pika
from aio_pika.abc import AbstractExchange, AbstractQueue, AbstractRobustChannel, AbstractRobustConnection

from core.settings import Settings

log = logging.getLogger(__name__)

ROUTING_KEY = "train"
CONTENT_TYPE = "application/json"
# A message that keeps killing its consumer (redelivered this often) is dead-lettered by the broker.
DELIVERY_LIMIT = 10


class MalformedMessageError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    exchange: str
    queue: str
    dead_letter_exchange: str
    dead_letter_queue: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Topology:
        return cls(
            exchange=settings.training.exchange,
            queue=settings.training.queue,
            dead_letter_exchange=f"{settings.training.exchange}.dead",
            dead_letter_queue=settings.training.dead_letter_queue,
        )


def encode(job_id: UUID) -> bytes:
    return json.dumps({"job_id": str(job_id)}).encode()


def decode(body: bytes) -> UUID:
    try:
        payload = json.loads(body)
        return UUID(str(payload["job_id"]))
    except (ValueError, TypeError, KeyError) as exc:
        raise MalformedMessageError(f"not a training request ({type(exc).__name__}: {exc})") from exc


async def connect(url: str, name: str) -> AbstractRobustConnection:
    """A connection that re-opens itself, its channels, queues and consumers after the broker
    comes back."""
    return await aio_pika.connect_robust(
        url, client_properties={"connection_name": name}, timeout=10, reconnect_interval=2
    )


async def declare(channel: AbstractRobustChannel, topology: Topology) -> tuple[AbstractExchange, AbstractQueue]:
    """Durable exchanges, a quorum queue (replicated, survives broker restarts) and its
    dead-letter queue. Declaring is idempotent, so publishers and consumers both do it."""
    exchange = await channel.declare_exchange(topology.exchange, aio_pika.ExchangeType.DIRECT, durable=True)
    dead_exchange = await channel.declare_exchange(
        topology.dead_letter_exchange, aio_pika.ExchangeType.FANOUT, durable=True
    )
    dead_queue = await channel.declare_queue(
        topology.dead_letter_queue, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead_queue.bind(dead_exchange, routing_key="#")
    queue = await channel.declare_queue(
        topology.queue,
        durable=True,
        arguments={
            "x-queue-type": "quorum",
            "x-dead-letter-exchange": topology.dead_letter_exchange,
            "x-delivery-limit": DELIVERY_LIMIT,
        },
    )
    await queue.bind(exchange, routing_key=ROUTING_KEY)
    return exchange, queue


def request_message(job_id: UUID, traceparent: str | None) -> aio_pika.Message:
    headers: dict[str, Any] = {"x-job-id": str(job_id)}
    if traceparent:
        headers["traceparent"] = traceparent
    return aio_pika.Message(
        encode(job_id),
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=f"{job_id}",
        timestamp=datetime.now(UTC),
        headers=headers,
    )


def dead_letter_message(body: bytes, headers: dict[str, Any], reason: str, job_id: UUID | None) -> aio_pika.Message:
    extra: dict[str, Any] = {"x-error": reason[:2000], "x-dead-lettered-at": datetime.now(UTC).isoformat()}
    if job_id is not None:
        extra["x-job-id"] = str(job_id)
    return aio_pika.Message(
        body,
        content_type=CONTENT_TYPE,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        timestamp=datetime.now(UTC),
        headers={**headers, **extra},
    )


class Publisher:
    """Publishes with publisher confirms: `publish` returns only once the broker has the message
    on disk (a quorum queue confirms after a majority has written it)."""

    def __init__(self, url: str, topology: Topology, name: str) -> None:
        self._url = url
        self._topology = topology
        self._name = name
        self._connection: AbstractRobustConnection | None = None
        self._exchange: AbstractExchange | None = None
        self._dead_exchange: AbstractExchange | None = None

    async def _ready(self) -> tuple[AbstractExchange, AbstractExchange]:
        if self._connection is None or self._connection.is_closed:
            self._connection = await connect(self._url, self._name)
            self._exchange = self._dead_exchange = None
        if self._exchange is None or self._dead_exchange is None:
            channel = await self._connection.channel(publisher_confirms=True)
            self._exchange, _ = await declare(channel, self._topology)
            self._dead_exchange = await channel.get_exchange(self._topology.dead_letter_exchange)
        return self._exchange, self._dead_exchange

    async def publish(self, job_id: UUID, traceparent: str | None) -> None:
        exchange, _ = await self._ready()
        # mandatory: a message no queue would take raises instead of vanishing.
        await exchange.publish(request_message(job_id, traceparent), routing_key=ROUTING_KEY, mandatory=True)

    async def dead_letter(self, message: aio_pika.Message) -> None:
        _, dead_exchange = await self._ready()
        await dead_exchange.publish(message, routing_key=ROUTING_KEY, mandatory=True)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()
            self._connection = None
