"""The worker and the shards: every queue consumed, a backlog in one shard not holding back
another, QUEUE_SHARDS grown with scores waiting and none lost, dead letters of every shard
(README, "Sharded queues")."""

import asyncio
from collections.abc import Iterable, Sequence

import aio_pika
import asyncpg

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.dead_letters import QUEUE_HEADER
from shared.settings import Settings
from shared.topology import (
    API_EXCHANGE,
    QUEUE,
    persist_queues,
    shard_of,
    shard_queue,
    shard_routing_key,
)
from tests.cli.test_dlq import dlq_ok, peek_dead_letters, wait_for_dead_count
from tests.conftest import ENTITY, basic_auth, score_body, serving, wait_for_count
from tests.support.messages import to_amqp_message
from tests.support.processes import connect_broker, running_worker, score_message
from tests.worker.test_batch_messages import scores_batch
from tests.worker.test_health_and_metrics import sample, scrape

COUNT_SCORES = "SELECT count(*) FROM scores"


def project_in_shard(shard: int, shards: int, skip: Iterable[str] = ()) -> str:
    """A project of ENTITY whose scores go to this shard of `shards`."""
    taken = set(skip)
    i = 0
    while True:
        project = f"shard-test-{i}"
        if project not in taken and shard_of(ENTITY, project, shards) == shard:
            return project
        i += 1


def sharded(settings: Settings, shards: int, **changes: object) -> Settings:
    return settings.model_copy(update={"queue_shards": shards, **changes})


async def publish_to_shard(
    settings: Settings, shard: int, messages: Sequence[aio_pika.Message]
) -> None:
    """Publish as the api does (to scores.api with the shard's key), confirmed, in order."""
    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(API_EXCHANGE, ensure=False)
        key = shard_routing_key(shard)
        for start in range(0, len(messages), 500):
            await asyncio.gather(
                *(exchange.publish(m, key, mandatory=True) for m in messages[start : start + 500])
            )


def scores_of(project: str, count: int, label: str) -> list[ScoreMessage]:
    return [
        score_message(project=project, prediction_id=f"{label}-{i}", value={"i": i})
        for i in range(count)
    ]


async def test_a_worker_consumes_every_shard_and_reports_each_queue(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = sharded(settings, 3)
    scores = [score_message(project=project_in_shard(shard, 3)) for shard in range(3)]
    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        for shard, score in enumerate(scores):
            await publish_to_shard(settings, shard, [to_amqp_message(score)])
        assert await wait_for_count(db, COUNT_SCORES, 3) == 3
        for name in persist_queues(settings):
            assert await broker.consumer_count(name) == 1, name
        assert worker._consumer.queues == persist_queues(settings)

        # The chores poll every queue's depth and consumers (every five seconds).
        async def consumers_reported() -> bool:
            samples = await scrape(worker)
            return all(
                sample(samples, "score_ingest_queue_consumers", queue=name) == 1
                for name in persist_queues(settings)
            )

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 15
        while not await consumers_reported():
            assert loop.time() < deadline, "score_ingest_queue_consumers not reported per queue"
            await asyncio.sleep(0.2)
        samples = await scrape(worker)
        for name in persist_queues(settings):
            assert sample(samples, "score_ingest_queue_depth", queue=name) == 0, name


async def test_a_backlog_in_one_shard_does_not_hold_back_another(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # Small batches: the backlog takes many, so where the other shard's score falls shows.
    settings = sharded(settings, 2, worker_batch_size=50)
    busy, quiet = project_in_shard(0, 2), project_in_shard(1, 2)
    backlog = scores_of(busy, 3000, "backlog")
    await publish_to_shard(settings, 0, [to_amqp_message(score) for score in backlog])
    lone = score_message(project=quiet, prediction_id="lone")

    async with running_worker(settings):
        # The worker is busy with the backlog (and holds a window of it) when the lone score
        # of the other shard arrives.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while await db.fetchval(COUNT_SCORES) < 100:
            assert loop.time() < deadline, "the backlog is not being stored"
            await asyncio.sleep(0.01)
        await publish_to_shard(settings, 1, [to_amqp_message(lone)])
        total = len(backlog) + 1
        assert await wait_for_count(db, COUNT_SCORES, total, timeout=60) == total

    stored_before = await db.fetchval(
        "SELECT count(*) FROM scores WHERE project = $1 AND persisted_at < "
        "(SELECT persisted_at FROM scores WHERE project = $2)",
        busy,
        quiet,
    )
    # In one queue it would wait behind every message delivered before it (a window of up
    # to WORKER_PREFETCH); taken in turn, it goes into one of the next batches.
    assert stored_before < len(backlog) // 2, f"{stored_before} of the backlog went first"


async def test_a_shard_of_single_scores_is_not_held_back_by_one_of_batch_messages(
    settings: Settings, db: asyncpg.Connection
) -> None:
    """A batch takes a turn's scores from each queue, not one message: taken one message
    each, 200 single scores would get one into a batch per batch message of 100 beside them
    (a few per batch), and wait for the whole of the other shard's backlog."""
    settings = sharded(settings, 2, worker_batch_size=400)
    busy, quiet = project_in_shard(0, 2), project_in_shard(1, 2)
    busy_scores = scores_of(busy, 8000, "busy")
    batches = [
        scores_batch(busy_scores[start : start + 100], f"busy-{start}")
        for start in range(0, len(busy_scores), 100)
    ]
    await publish_to_shard(settings, 0, batches)
    singles = scores_of(quiet, 200, "quiet")
    await publish_to_shard(settings, 1, [to_amqp_message(score) for score in singles])

    async with running_worker(settings):
        total = len(busy_scores) + len(singles)
        assert await wait_for_count(db, COUNT_SCORES, total, timeout=60) == total

    stored_before = await db.fetchval(
        "SELECT count(*) FROM scores WHERE project = $1 AND persisted_at < "
        "(SELECT max(persisted_at) FROM scores WHERE project = $2)",
        busy,
        quiet,
    )
    assert stored_before < len(busy_scores) // 2, f"{stored_before} of the backlog went first"


async def test_growing_the_shards_with_scores_waiting_loses_none(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    two, four = sharded(settings, 2), sharded(settings, 4)
    projects = [f"grow-{i}" for i in range(16)]
    # Some projects move to the new shards 2 and 3, the rest stay in 0 and 1.
    assert {shard_of(ENTITY, p, 4) for p in projects} == {0, 1, 2, 3}
    moved = [p for p in projects if shard_of(ENTITY, p, 4) >= 2]

    async def post(app_settings: Settings, label: str) -> None:
        async with serving(app_settings) as client:
            for project in projects:
                for i in range(5):
                    response = await client.post(
                        f"/v2/{ENTITY}/{project}/scores",
                        json=score_body(prediction_id=f"{label}-{i}"),
                        headers=basic_auth(api_key),
                    )
                    assert response.status_code == 200, response.text

    per_round = len(projects) * 5
    await post(two, "before")  # waiting in shards 0 and 1: no worker yet
    async with connect_broker(four) as broker:
        async with running_worker(two):
            # The apis move to four shards first, against the documented order: the scores
            # of moved projects wait in shards 2 and 3, which these workers do not consume.
            await post(four, "during")
            stayed = per_round * 2 - 5 * len(moved)
            assert await wait_for_count(db, COUNT_SCORES, stayed, timeout=30) == stayed
            waiting = [await broker.ready_count(shard_queue(s)) for s in (2, 3)]
            assert sum(waiting) > 0, "no score waited in a new shard"
        async with running_worker(four):
            total = per_round * 2
            assert await wait_for_count(db, COUNT_SCORES, total, timeout=30) == total
        for name in persist_queues(four):
            await broker.assert_stays_empty(name)

    distinct = await db.fetchval("SELECT count(DISTINCT (project, prediction_id)) FROM scores")
    assert distinct == per_round * 2, "every score stored once"


async def test_dead_letters_of_every_shard_are_listed_and_replayed_to_scores(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = sharded(settings, 2, worker_health_port=0)
    good = score_message(project=project_in_shard(0, 2))
    async with connect_broker(settings) as broker:
        # The broker's own dead-lettering: a good score rejected from shard 0.
        await publish_to_shard(settings, 0, [to_amqp_message(good)])
        connection = await aio_pika.connect(settings.amqp_url, timeout=10)
        async with connection:
            queue = await (await connection.channel()).get_queue(shard_queue(0), ensure=False)
            taken = await queue.get(no_ack=False, fail=False, timeout=10)
            assert taken is not None
            await taken.reject(requeue=False)
        # The worker's: a body that is no JSON, in shard 1.
        poison = aio_pika.Message(b"not json", content_type=CONTENT_TYPE, type=MESSAGE_TYPE)
        async with running_worker(settings):
            await publish_to_shard(settings, 1, [poison])
            assert await wait_for_dead_count(broker, 2) == 2

        sources = set()
        for letter in await peek_dead_letters(settings):
            deaths = letter.headers.get("x-death") or []
            sources.add(letter.headers.get(QUEUE_HEADER) or deaths[0]["queue"])
        assert sources == {shard_queue(0), shard_queue(1)}
        assert "2 dead letter(s)" in (await dlq_ok(settings, "list")).stderr

        assert "replayed 2 dead letter(s)" in (await dlq_ok(settings, "replay")).stderr
        async with running_worker(settings):
            # Replayed to `scores`: the good score is stored, the poison is validated in full
            # and refused again, now from scores.persist.
            assert await wait_for_count(db, COUNT_SCORES, 1) == 1
            assert await wait_for_dead_count(broker, 1) == 1
        (again,) = await peek_dead_letters(settings)
        assert again.headers[QUEUE_HEADER] == QUEUE
        assert again.body == b"not json"
    stored = await db.fetchval("SELECT score_id FROM scores")
    assert stored == good.score_id
