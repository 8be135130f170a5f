"""The api's shards: each project's scores go to one shard's queue, chosen by a stable hash of
entity and project; singles sent together are gathered per shard (README, "Sharded queues")."""

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aio_pika.exceptions import ChannelPreconditionFailed

from shared.contract import BATCH_MESSAGE_TYPE
from shared.settings import Settings
from shared.topology import (
    API_EXCHANGE,
    QUEUE,
    declare_topology,
    persist_queue_arguments,
    persist_queues,
    shard_of,
    shard_queue,
    shard_queue_arguments,
    shard_routing_key,
)
from tests.conftest import ENTITY, basic_auth, score_body, serving

SHARDS = 3


def test_the_shard_is_the_documented_hash_of_entity_and_project() -> None:
    # The formula the README gives direct tooling: the first 8 bytes of SHA-256, big-endian.
    for entity, project in [("acme", "evals"), ("a", "b/c"), ("ünï", "cödé"), ("x", "")]:
        digest = hashlib.sha256(f"{entity}/{project}".encode()).digest()
        for shards in (1, 2, 4, 7):
            assert shard_of(entity, project, shards) == int.from_bytes(digest[:8]) % shards


def test_projects_spread_over_every_shard() -> None:
    counts = Counter(shard_of("acme", f"project-{i}", 4) for i in range(2000))
    assert sorted(counts) == [0, 1, 2, 3]
    assert all(350 <= count <= 650 for count in counts.values()), counts


def projects_by_shard() -> dict[int, str]:
    """One project of ENTITY for each of SHARDS shards."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < SHARDS:
        found.setdefault(shard_of(ENTITY, f"project-{i}", SHARDS), f"project-{i}")
        i += 1
    return found


@pytest.fixture
def sharded(settings: Settings) -> Settings:
    return settings.model_copy(update={"queue_shards": SHARDS})


@pytest.fixture
async def channel(sharded: Settings) -> AsyncIterator[AbstractChannel]:
    """A channel on the vhost, the sharded topology declared and its shards emptied, before
    and after (the other api tests run unsharded and leave the shards alone)."""
    connection = await aio_pika.connect(sharded.amqp_url)
    async with connection:
        opened = await connection.channel()
        topology = await declare_topology(opened, sharded)
        for queue in topology.shard_queues:
            await queue.purge()
        yield opened
        for queue in topology.shard_queues:
            await queue.purge()


async def take_all(channel: AbstractChannel, name: str) -> list[AbstractIncomingMessage]:
    """Every message waiting in a queue, removed."""
    queue = await channel.get_queue(name, ensure=False)
    taken = []
    while (message := await queue.get(no_ack=True, fail=False)) is not None:
        taken.append(message)
    return taken


def projects_in(message: AbstractIncomingMessage) -> list[str]:
    """The project of each score a message holds."""
    body = json.loads(message.body)
    scores = body["scores"] if message.type == BATCH_MESSAGE_TYPE else [body]
    return [score["project"] for score in scores]


async def test_each_project_goes_to_its_shard_through_the_api_exchange(
    sharded: Settings, channel: AbstractChannel, api_key: str
) -> None:
    projects = projects_by_shard()
    async with serving(sharded) as client:
        for project in projects.values():
            url = f"/v2/{ENTITY}/{project}/scores"
            single = await client.post(url, json=score_body(), headers=basic_auth(api_key))
            assert single.status_code == 200, single.text
            batch = await client.post(
                f"{url}/batch",
                json={"scores": [score_body(prediction_id=f"p-{i}") for i in range(5)]},
                headers=basic_auth(api_key),
            )
            assert batch.status_code == 200, batch.text

    for shard, project in projects.items():
        messages = await take_all(channel, shard_queue(shard))
        assert [len(projects_in(m)) for m in messages] == [1, 5], shard
        assert {p for m in messages for p in projects_in(m)} == {project}
        # Trusted by the worker: the broker says it came through scores.api.
        assert {m.exchange for m in messages} == {API_EXCHANGE}
        assert {m.routing_key for m in messages} == {shard_routing_key(shard)}
    assert await take_all(channel, QUEUE) == [], "scores.persist holds direct publishers' only"


async def test_singles_sent_together_are_gathered_per_shard(
    sharded: Settings, channel: AbstractChannel, api_key: str
) -> None:
    projects = projects_by_shard()
    per_project = 20
    async with serving(sharded) as client:

        async def post(project: str) -> int:
            url = f"/v2/{ENTITY}/{project}/scores"
            response = await client.post(url, json=score_body(), headers=basic_auth(api_key))
            return response.status_code

        codes = await asyncio.gather(
            *(post(project) for _ in range(per_project) for project in projects.values())
        )
    assert codes == [200] * (per_project * SHARDS)

    for shard, project in projects.items():
        messages = await take_all(channel, shard_queue(shard))
        held = [p for m in messages for p in projects_in(m)]
        # Each shard's queue holds its project's scores and nothing else, and requests that
        # arrived together shared messages.
        assert held == [project] * per_project, shard
        assert len(messages) < per_project, "no single was gathered with another"


async def test_topology_declares_the_shards_idempotently_and_fewer_delete_none(
    sharded: Settings, channel: AbstractChannel
) -> None:
    topology = await declare_topology(channel, sharded)
    assert [q.name for q in topology.shard_queues] == persist_queues(sharded)[1:]
    again = await declare_topology(channel, sharded)
    assert [q.name for q in again.shard_queues] == [q.name for q in topology.shard_queues]
    fewer = await declare_topology(channel, sharded.model_copy(update={"queue_shards": 1}))
    assert [q.name for q in fewer.shard_queues] == [shard_queue(0)]
    for shard in range(SHARDS):
        declared = await channel.declare_queue(shard_queue(shard), passive=True)
        assert declared.name == shard_queue(shard), "declaring fewer shards deletes none"


async def test_the_shards_spread_their_leaders_and_scores_persist_keeps_its_arguments(
    sharded: Settings, channel: AbstractChannel
) -> None:
    arguments = dict(persist_queue_arguments(sharded))
    # RabbitMQ checks the leader locator on redeclaring: a shard refuses the declaration
    # without it, and scores.persist one with it.
    for name, declared_with in [
        (shard_queue(0), arguments),
        (QUEUE, {**arguments, "x-queue-leader-locator": "balanced"}),
    ]:
        async with await aio_pika.connect(sharded.amqp_url) as connection:
            other = await connection.channel()
            with pytest.raises(ChannelPreconditionFailed, match="x-queue-leader-locator"):
                await other.declare_queue(name, durable=True, arguments=declared_with)
    assert shard_queue_arguments(sharded)["x-queue-leader-locator"] == "balanced"
