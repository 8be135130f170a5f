"""The broker topology: a public contract that direct publishers rely on.

Exchange `scores` (topic) routes `score.create` to quorum queue `scores.persist`, whose dead
letters go through exchange `scores.dlx` to quorum queue `scores.dead`. Exchange `scores.api`
(direct) routes `score.create` to the same queue: the api publishes there and nowhere else,
and the broker's permissions let no other user write to it, so the worker trusts what comes
through it as validated by the api (worker/decode.py; README, "Trust model").

Sharding (README, "Sharded queues"): with QUEUE_SHARDS = N > 0 the api publishes to
`scores.api` with routing key `score.create.<i>`, i = shard_of(entity, project, N), to quorum
queue `scores.persist.<i>`; `scores.persist` then holds direct publishers' messages only (and
those of apis still unsharded). Workers consume every queue of persist_queues(). The shard
queues' leaders spread over the cluster's nodes (`x-queue-leader-locator: balanced`, which
`scores.persist` cannot take without being deleted: the argument is checked on redeclaring).

Declaring is idempotent; queue arguments cannot change once a queue exists (RabbitMQ refuses
the declaration with PRECONDITION_FAILED), so changing them means draining and deleting it.
"""

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Final

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange, AbstractQueue
from aio_pika.exceptions import CONNECTION_EXCEPTIONS
from pamqp.common import FieldTable

from shared.broker import BrokerNodes, connect_to_a_node, tls_context
from shared.settings import Settings

EXCHANGE: Final = "scores"
# Only the api's broker user may write to it (a permission, not a property of the exchange:
# it is not a RabbitMQ `internal` exchange, which no client could publish to).
API_EXCHANGE: Final = "scores.api"
ROUTING_KEY: Final = "score.create"
QUEUE: Final = "scores.persist"
SHARD_QUEUE_PREFIX: Final = "scores.persist."
DEAD_LETTER_EXCHANGE: Final = "scores.dlx"
DEAD_LETTER_QUEUE: Final = "scores.dead"


def persist_queue_arguments(settings: Settings) -> FieldTable:
    """Arguments of `scores.persist`: quorum, bounded, at-least-once dead-lettering."""
    return {
        "x-queue-type": "quorum",
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-max-length": settings.queue_max_length,
        "x-max-length-bytes": settings.queue_max_length_bytes,
        "x-delivery-limit": settings.queue_delivery_limit,
    }


@lru_cache(maxsize=4096)  # the api asks for every score it publishes
def shard_of(entity: str, project: str, shards: int) -> int:
    """The shard of a project's scores: the first 8 bytes of SHA-256 of `entity/project`
    (UTF-8), big-endian, modulo the number of shards; stable across processes and versions."""
    digest = hashlib.sha256(f"{entity}/{project}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_routing_key(shard: int) -> str:
    """The routing key, on `scores.api`, of a shard's queue."""
    return f"{ROUTING_KEY}.{shard}"


def shard_queue(shard: int) -> str:
    """The name of a shard's queue."""
    return f"{SHARD_QUEUE_PREFIX}{shard}"


def api_queue(entity: str, project: str, shards: int) -> str:
    """The queue an api with `shards` shards sends a project's scores to."""
    return shard_queue(shard_of(entity, project, shards)) if shards else QUEUE


def persist_queues(settings: Settings) -> list[str]:
    """Every queue the worker consumes: `scores.persist`, then each shard's queue."""
    return [QUEUE, *(shard_queue(shard) for shard in range(settings.queue_shards))]


def shard_queue_arguments(settings: Settings) -> FieldTable:
    """Arguments of a shard's queue: those of `scores.persist`, leaders spread over nodes."""
    return {**persist_queue_arguments(settings), "x-queue-leader-locator": "balanced"}


@dataclass(frozen=True)
class Topology:
    """Handles to the declared exchanges and queues, on the channel that declared them."""

    exchange: AbstractExchange
    api_exchange: AbstractExchange
    dead_letter_exchange: AbstractExchange
    queue: AbstractQueue
    dead_letter_queue: AbstractQueue
    shard_queues: tuple[AbstractQueue, ...] = ()


async def declare_topology_once(
    settings: Settings, connect_timeout: float, node_url: str | None = None
) -> None:
    """Declare the topology through a connection of its own, closed afterwards: to node_url
    (one node's URL, see shared/broker.py), else to the first of AMQP_URL's nodes that
    answers."""
    tls = tls_context(settings)

    async def connect(url: str) -> AbstractConnection:
        return await aio_pika.connect(url, timeout=connect_timeout, ssl_context=tls)

    if node_url is None:
        nodes = BrokerNodes(settings.amqp_url)
        connection = await connect_to_a_node(connect, CONNECTION_EXCEPTIONS, nodes)
    else:
        connection = await connect(node_url)
    async with connection:
        await declare_topology(await connection.channel(), settings)


async def declare_topology(channel: AbstractChannel, settings: Settings) -> Topology:
    """Declare exchanges, queues and bindings; safe to run any number of times."""
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
    api_exchange = await channel.declare_exchange(
        API_EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True
    )
    dead_letter_exchange = await channel.declare_exchange(
        DEAD_LETTER_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
    )
    dead = await channel.declare_queue(
        DEAD_LETTER_QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
    )
    await dead.bind(dead_letter_exchange, routing_key="#")
    persist = await channel.declare_queue(
        QUEUE, durable=True, arguments=persist_queue_arguments(settings)
    )
    await persist.bind(exchange, routing_key=ROUTING_KEY)
    # Apis still unsharded (QUEUE_SHARDS=0, or older ones during a migration) publish here.
    await persist.bind(api_exchange, routing_key=ROUTING_KEY)
    shards = []
    for shard in range(settings.queue_shards):
        queue = await channel.declare_queue(
            shard_queue(shard), durable=True, arguments=shard_queue_arguments(settings)
        )
        await queue.bind(api_exchange, routing_key=shard_routing_key(shard))
        shards.append(queue)
    return Topology(exchange, api_exchange, dead_letter_exchange, persist, dead, tuple(shards))
