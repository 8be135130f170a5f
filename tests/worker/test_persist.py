"""The worker turns score messages into rows: every column, every message, exactly once."""

import json
from datetime import datetime, timedelta, timezone

import aio_pika
import asyncpg

from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import wait_for_count
from tests.support.messages import assert_stored_as_sent, to_amqp_message
from tests.support.processes import (
    connect_broker,
    running_worker,
    score_message,
    wait_until,
)
from worker import sql as worker_sql
from worker.decode import row_of

COUNT_SCORES = "SELECT count(*) FROM scores"


async def test_a_published_score_becomes_a_row_with_every_column(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = [
        score_message(),
        score_message(
            value={"nested": {"list": [1, 2.5, None, True, "x"]}, "text": "héllo ✓ 🎉"},
            evaluation_run_id=None,
            created_at=datetime(
                2024, 2, 29, 23, 59, 59, 999999, tzinfo=timezone(timedelta(hours=5))
            ),
        ),
        score_message(value=10**30, prediction_id="p/with spaces & ünïcode"),
        score_message(value="just a string"),
        score_message(value=None),
    ]
    async with connect_broker(settings) as broker, running_worker(settings):
        await broker.publish_scores(scores)
        assert await wait_for_count(db, COUNT_SCORES, len(scores)) == len(scores)

    rows = await assert_stored_as_sent(db, scores)
    for score in scores:
        row = rows[score.score_id]
        assert row["persisted_at"] >= score.created_at


async def test_a_large_burst_lands_exactly_once_and_drains_the_queue(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = [score_message(prediction_id=f"prediction-{i}", value=i) for i in range(1200)]
    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish_scores(scores)
            assert await wait_for_count(db, COUNT_SCORES, 1200, timeout=30) == 1200
        assert worker.persisted == 1200
        assert worker.duplicates == 0
        await broker.assert_stays_empty(QUEUE)
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

    rows = await db.fetch("SELECT score_id, value FROM scores")
    assert {row["score_id"]: json.loads(row["value"]) for row in rows} == {
        score.score_id: score.value for score in scores
    }


async def test_republished_and_requeued_messages_make_one_row(
    settings: Settings, db: asyncpg.Connection
) -> None:
    twice, requeued, returned = score_message(), score_message(), score_message()
    async with connect_broker(settings) as broker:
        await broker.publish_scores([twice, twice, requeued])
        # Before any worker runs, a consumer nacks one with requeue and drops another unacked.
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.get_queue(QUEUE, ensure=False)
            await broker.publish_scores([returned])
            taken = [await queue.get(timeout=5) for _ in range(4)]
            by_id = {message.message_id: message for message in taken}
            await by_id[str(requeued.score_id)].nack(requeue=True)
        assert await broker.wait_for_ready_count(QUEUE, 4) == 4

        async with running_worker(settings) as worker:
            assert await wait_for_count(db, COUNT_SCORES, 3) == 3
            await wait_until(lambda: worker.persisted + worker.duplicates == 4, "all 4 stored")
        assert (worker.persisted, worker.duplicates) == (3, 1)
        await broker.assert_stays_empty(QUEUE)

    stored = await db.fetch("SELECT score_id FROM scores")
    assert sorted(row["score_id"] for row in stored) == sorted(
        score.score_id for score in (twice, requeued, returned)
    )


async def test_a_score_already_stored_is_acked_without_a_second_row(
    settings: Settings, db: asyncpg.Connection
) -> None:
    original = score_message(value={"version": "original"})
    await db.execute(worker_sql.INSERT_SCORES, *([value] for value in row_of(original)))
    changed = original.model_copy(update={"value": {"version": "republished"}})
    fresh = score_message()
    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            await broker.publish_scores([original, changed, fresh])
            assert await wait_for_count(db, COUNT_SCORES, 2) == 2
            await wait_until(lambda: worker.duplicates == 2, "both copies seen as duplicates")
        assert worker.persisted == 1
        await broker.assert_stays_empty(QUEUE)
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

    value = await db.fetchval("SELECT value FROM scores WHERE score_id = $1", original.score_id)
    assert json.loads(value) == {"version": "original"}


async def test_a_message_without_type_or_with_charset_is_still_a_score(
    settings: Settings, db: asyncpg.Connection
) -> None:
    untyped = to_amqp_message(score_message())
    untyped.type = None
    with_charset = to_amqp_message(score_message())
    with_charset.content_type = "application/json; charset=utf-8"
    async with connect_broker(settings) as broker:
        async with running_worker(settings):
            await broker.publish([untyped, with_charset])
            assert await wait_for_count(db, COUNT_SCORES, 2) == 2
        await broker.assert_stays_empty(QUEUE)
        assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0
