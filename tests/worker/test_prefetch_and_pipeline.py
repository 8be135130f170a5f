"""The worker's prefetch window follows message size, and its pipeline loses and repeats nothing.

(a) Large score.batch.v1 messages shrink the prefetch window to a share of WORKER_PREFETCH_BYTES,
    and the broker then holds back the backlog instead of pushing it all into the worker. The
    byte gate alone would bound the worker's memory, not what the broker hands it: with the
    window left at WORKER_PREFETCH, 29 of these 31 messages were out to the worker at once,
    none left in the queue for another.
(b) Small messages widen the window again, up to WORKER_PREFETCH.
(c) Storing batch N while collecting batch N+1 stores every score once, in delivery order, and a
    worker stopped mid-drain stores and acks everything it was given and returns nothing.

RabbitMQ's own unacked count (rabbitmqctl list_queues messages_unacknowledged) is a statistic a
quorum queue refreshes only every few seconds, too coarse for a drain of a few seconds, and the
management plugin may be absent. So the tests read only what the broker answers at once: the
ready count (passive queue.declare) and what a clean stop hands back (unacked messages return to
the queue, marked redelivered).
"""

import asyncio
import json
import math
from collections.abc import Sequence
from typing import Any

import aio_pika
import asyncpg
from aio_pika.abc import AbstractIncomingMessage

from shared.contract import MAX_BATCH_SCORES, ScoreMessage
from shared.settings import MIB, Settings
from shared.topology import QUEUE
from tests.conftest import wait_for_count
from tests.support.processes import connect_broker, running_worker, score_message, wait_until
from tests.worker.test_batch_messages import as_json, batch_message, ids, stored_ids
from tests.worker.test_health_and_metrics import sample, scrape
from worker.worker import ScoreWorker

COUNT_SCORES = "SELECT count(*) FROM scores"
PREFETCH_GAUGE = "score_ingest_worker_prefetch"
LARGE_MESSAGE_BYTES = 400_000
LARGE_MESSAGES = 30
SINGLES = 5_000


def fitting(settings: Settings, **changes: Any) -> Settings:
    """Settings whose worker fits its prefetch window to 1 MiB, WORKER_PREFETCH 2000, and
    consumes scores.persist only: the gauge is then that queue's window."""
    return settings.model_copy(
        update={"worker_prefetch_bytes": MIB, "worker_prefetch": 2000, "queue_shards": 0, **changes}
    )


def large_batch(label: str) -> tuple[list[ScoreMessage], aio_pika.Message]:
    """A score.batch.v1 message of MAX_BATCH_SCORES scores, about LARGE_MESSAGE_BYTES long."""
    scores = [
        score_message(prediction_id=f"{label}-{i}", value={"i": i}) for i in range(MAX_BATCH_SCORES)
    ]
    unpadded = len(json.dumps({"scores": [as_json(score) for score in scores]}))
    pad = "x" * max(0, (LARGE_MESSAGE_BYTES - unpadded) // MAX_BATCH_SCORES - 12)
    scores = [
        score.model_copy(update={"value": {"i": i, "pad": pad}}) for i, score in enumerate(scores)
    ]
    body = json.dumps({"scores": [as_json(score) for score in scores]}).encode()
    assert abs(len(body) - LARGE_MESSAGE_BYTES) < LARGE_MESSAGE_BYTES // 20, len(body)
    return scores, batch_message(body, label)


def singles(count: int, label: str) -> list[ScoreMessage]:
    """count single scores, their prediction_id giving their publishing order."""
    return [score_message(prediction_id=f"{label}-{i}", value={"i": i}) for i in range(count)]


async def prefetch_gauge(worker: ScoreWorker) -> float:
    """score_ingest_worker_prefetch as the worker's /metrics shows it."""
    return sample(await scrape(worker), PREFETCH_GAUGE)


async def wait_for_gauge(worker: ScoreWorker, wanted: str, holds: Any, timeout: float = 5) -> float:
    """Poll the prefetch gauge until holds(value); fail saying what was wanted."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not holds(value := await prefetch_gauge(worker)):
        assert loop.time() < deadline, f"{PREFETCH_GAUGE} is {value}, not {wanted}"
        await asyncio.sleep(0.05)
    return value


async def publish_in_order(settings: Settings, scores: Sequence[ScoreMessage]) -> None:
    """Publish single-score messages, confirmed, before any worker runs; the queue holds them in
    this order (aiormq writes concurrent publishes of one channel in call order, under a lock)."""
    async with connect_broker(settings) as broker:
        await broker.publish_scores(scores)
        ready = await broker.ready_count(QUEUE)
        assert ready == len(scores), f"{ready} of {len(scores)} published messages are queued"


async def take_all(settings: Settings, expected: int) -> list[AbstractIncomingMessage]:
    """Consume (auto-ack) every message of scores.persist; expected of them, within 10 s."""
    taken: list[AbstractIncomingMessage] = []
    enough = asyncio.Event()

    async def keep(message: AbstractIncomingMessage) -> None:
        taken.append(message)
        if len(taken) >= expected:
            enough.set()

    connection = await aio_pika.connect(settings.amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(QUEUE, ensure=False)
        tag = await queue.consume(keep, no_ack=True)
        if expected:
            await asyncio.wait_for(enough.wait(), 10)
        await queue.cancel(tag)
    return taken


def persisted_at_in_publishing_order(rows: Sequence[asyncpg.Record], label: str) -> list[Any]:
    """persisted_at of rows of singles(…, label), in the order the scores were published."""
    by_index = {int(row["prediction_id"].removeprefix(f"{label}-")): row for row in rows}
    return [by_index[i]["persisted_at"] for i in range(len(by_index))]


# (a) -------------------------------------------------------------------------------------------


async def test_large_messages_shrink_the_window_and_the_broker_holds_back_the_backlog(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = fitting(settings)
    first_scores, first = large_batch("first")
    backlog = [large_batch(f"large-{n}") for n in range(LARGE_MESSAGES)]
    everything = first_scores + [score for scores, _ in backlog for score in scores]

    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        # Until the first message shows their size, the window starts small.
        assert 2 <= await prefetch_gauge(worker) <= 100

        # The first large message makes the worker fit its window: 1 MiB / 400 kB, at least 2.
        await broker.publish([first])
        assert await wait_for_count(db, COUNT_SCORES, MAX_BATCH_SCORES) == MAX_BATCH_SCORES
        window = await wait_for_gauge(worker, "at most 5", lambda value: 2 <= value <= 5)
        assert window == max(2, MIB // LARGE_MESSAGE_BYTES)

        await broker.publish([message for _, message in backlog])
        published = 1 + LARGE_MESSAGES
        # While the backlog drains, every message is ready, unacked, or acked (and so stored,
        # one transaction each). ready and rows answer at once, so this is a lower bound on
        # what the broker has handed the worker and not had acked: it must stay within the
        # window, plus one message of slack.
        handed_out: list[tuple[int, int, int]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while True:
            ready = await broker.ready_count(QUEUE)
            rows: int = await db.fetchval(COUNT_SCORES)
            stored_messages = math.ceil(rows / MAX_BATCH_SCORES)
            handed_out.append((published - ready - stored_messages, ready, rows))
            if rows == len(everything) or loop.time() > deadline:
                break
            await asyncio.sleep(0.02)
        assert rows == len(everything), f"only {rows} of {len(everything)} scores stored in 20 s"
        await wait_until(lambda: worker.persisted == len(everything), "all scores counted")
        assert worker.duplicates == 0
        assert await prefetch_gauge(worker) == window, "the window stays fitted to large messages"

        most = max(handed_out)
        assert most[0] <= window + 1, (
            f"the broker had at least {most[0]} large messages out unacked (ready {most[1]}, "
            f"{most[2]} rows stored) with the prefetch window at {window}: the smaller window "
            f"did not reach the broker; samples (unacked at least, ready, rows): {handed_out}"
        )

    assert await stored_ids(db) == ids(everything)


# (b) -------------------------------------------------------------------------------------------


async def test_small_messages_widen_the_window_again(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # A window fits a quarter of the budget, counting each message four times its body:
    # 32 MiB fits WORKER_PREFETCH small messages, and at most 5 large ones.
    settings = fitting(settings, worker_prefetch_bytes=32 * MIB)
    large = [large_batch(f"large-{n}") for n in range(2)]
    small = singles(300, "small")
    everything = [score for scores, _ in large for score in scores] + small

    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        await broker.publish([message for _, message in large])
        assert await wait_for_count(db, COUNT_SCORES, 2 * MAX_BATCH_SCORES) == 2 * MAX_BATCH_SCORES
        await wait_for_gauge(worker, "at most 5", lambda value: value <= 5)

        await broker.publish_scores(small)
        # 8 MiB / a few kilobytes is more than WORKER_PREFETCH, so the window is the maximum.
        await wait_for_gauge(
            worker, "WORKER_PREFETCH again", lambda value: value == settings.worker_prefetch
        )
        assert await wait_for_count(db, COUNT_SCORES, len(everything)) == len(everything)
        await wait_until(lambda: worker.persisted == len(everything), "all scores counted")
        assert worker.duplicates == 0
        await broker.assert_stays_empty(QUEUE, seconds=0.2)

    assert await stored_ids(db) == ids(everything)


# (c) -------------------------------------------------------------------------------------------


async def test_a_pipelined_drain_stores_every_score_once_in_delivery_order(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"worker_batch_size": 100})
    scores = singles(SINGLES, "drain")
    await publish_in_order(settings, scores)

    async with connect_broker(settings) as broker:
        async with running_worker(settings) as worker:
            assert await wait_for_count(db, COUNT_SCORES, SINGLES) == SINGLES
            await wait_until(lambda: worker.persisted == SINGLES, "all scores counted")
            assert worker.duplicates == 0
            assert await broker.ready_count(QUEUE) == 0
        # Whatever the worker held unacked returns to the queue when its channel closes.
        await broker.assert_stays_empty(QUEUE)

    rows = await db.fetch("SELECT prediction_id, persisted_at FROM scores")
    assert await stored_ids(db) == ids(scores)
    # persisted_at is the start of the storing transaction: batch N+1's transaction starts
    # only after batch N's, so it never goes back in delivery (= publishing) order.
    times = persisted_at_in_publishing_order(rows, "drain")
    backwards = [i for i in range(1, len(times)) if times[i] < times[i - 1]]
    assert not backwards, f"scores {backwards[:10]} were stored before ones delivered earlier"
    assert len(set(times)) >= SINGLES // settings.worker_batch_size, "batches of at most 100"


async def test_a_worker_stopped_mid_drain_stores_what_it_acked_and_returns_nothing_unacked(
    settings: Settings, db: asyncpg.Connection
) -> None:
    settings = settings.model_copy(update={"worker_batch_size": 100})
    scores = singles(SINGLES, "stop")
    by_id = {score.score_id: score for score in scores}
    await publish_in_order(settings, scores)

    async with running_worker(settings) as first:
        # Stop once a few batches are stored, with thousands of messages still to go.
        await wait_for_count(db, "SELECT least(count(*), 500) FROM scores", 500)
    # running_worker returned: request_stop(), run() ended, the connection is closed.
    stored_by_first: int = await db.fetchval(COUNT_SCORES)
    assert 0 < stored_by_first < SINGLES, f"stopped after {stored_by_first} rows: not mid-drain"
    assert stored_by_first == first.persisted, "rows are exactly the scores the worker stored"
    assert first.duplicates == 0

    async with connect_broker(settings) as broker:
        # Every message is either stored (and was acked) or back in the queue, never both.
        # (Returned messages reach the queue shortly after the close; give them a moment.)
        await broker.wait_for_ready_count(QUEUE, SINGLES - stored_by_first, timeout=3)
        await asyncio.sleep(0.3)
        ready = await broker.ready_count(QUEUE)
        assert ready == SINGLES - stored_by_first, (
            f"{stored_by_first} rows stored but {ready} of {SINGLES} messages still queued"
        )
    left = await take_all(settings, ready)
    left_ids = {json.loads(message.body)["score_id"] for message in left}
    assert len(left_ids) == len(left) == ready
    assert {str(score_id) for score_id in await stored_ids(db)}.isdisjoint(left_ids)

    # A second worker gets what was left (republished as it was) and finishes the job.
    async with connect_broker(settings) as broker:
        leftovers = [score for score_id, score in by_id.items() if str(score_id) in left_ids]
        await broker.publish_scores(leftovers)
        async with running_worker(settings) as second:
            assert await wait_for_count(db, COUNT_SCORES, SINGLES) == SINGLES
            await wait_until(lambda: second.persisted == len(leftovers), "leftovers counted")
        assert second.duplicates == 0, "no score the first worker stored came back"
        await broker.assert_stays_empty(QUEUE)
    assert await stored_ids(db) == ids(scores)

    # Almost nothing the broker sent the first worker was left unacked at its stop: such a
    # message comes back redelivered (and with x-delivery-count, which counts towards the
    # queue's x-delivery-limit), not stored, so the checks above cannot tell it from an
    # unsent one. Deliveries that race the consumer's cancel can still come back, at most
    # a batch of them (README, "The worker and dead letters"); a window's worth must not.
    returned = sorted(
        int(json.loads(message.body)["prediction_id"].removeprefix("stop-"))
        for message in left
        if message.redelivered
    )
    assert len(returned) <= settings.worker_batch_size, (
        f"{len(returned)} messages sent to the stopped worker came back unacked (publishing "
        f"positions {returned[:3]}..{returned[-3:]}; the worker stored {stored_by_first})"
    )
