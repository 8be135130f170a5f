"""The worker loses and duplicates nothing when PostgreSQL or RabbitMQ fail or the worker dies.

Servers are cut off through a TcpProxy, and a batch is held "in the middle" by locking the
scores table from the test so that the worker's INSERT waits; the machine's shared servers
themselves are never stopped.
"""

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator

import asyncpg
import pytest

from shared.contract import ScoreMessage
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import wait_for_count
from tests.support.processes import (
    Broker,
    CliProcess,
    connect_broker,
    running_worker,
    score_message,
    wait_until,
    worker_process,
)
from tests.support.tcp_proxy import TcpProxy
from tests.worker.test_health_and_metrics import wait_for_status

COUNT_SCORES = "SELECT count(*) FROM scores"
COUNT_LOCK_WAITERS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
"""
STORE_RETRY_LOG = "storing"


@contextlib.asynccontextmanager
async def scores_table_locked(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on scores, so every INSERT blocks until the block ends."""
    await db.execute("BEGIN; LOCK TABLE scores IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        await db.execute("ROLLBACK")


async def wait_for_lock_waiters(db: asyncpg.Connection, expected: int) -> int:
    """Poll how many backends wait on a lock in this database: workers stuck behind ours
    (a worker may have more than one batch waiting)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:
        # Inside a transaction, pg_stat_activity is a snapshot taken at its first read.
        await db.execute("SELECT pg_stat_clear_snapshot()")
        count: int = await db.fetchval(COUNT_LOCK_WAITERS)
        if count >= expected or loop.time() > deadline:
            return count
        await asyncio.sleep(0.05)


def _scores(count: int) -> list[ScoreMessage]:
    return [score_message(prediction_id=f"prediction-{i}", value=i) for i in range(count)]


async def _assert_stored_exactly_once(db: asyncpg.Connection, scores: list[ScoreMessage]) -> None:
    rows = await db.fetch("SELECT score_id FROM scores")
    assert sorted(row["score_id"] for row in rows) == sorted(score.score_id for score in scores)


async def _stop_when_idle(worker: CliProcess) -> None:
    """SIGTERM a worker that has stored everything, once its acks had time to land."""
    worker.send_signal(signal.SIGTERM)
    assert await worker.wait(timeout=10) == 0


async def _assert_nothing_left(broker: Broker) -> None:
    await broker.assert_stays_empty(QUEUE)
    assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0


async def test_postgres_outage_keeps_messages_until_it_returns(
    settings: Settings, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    async with TcpProxy.for_url(settings.database_url) as proxy:
        proxied = settings.model_copy(
            update={"database_url": proxy.url_through(settings.database_url)}
        )
        async with connect_broker(settings) as broker:
            async with running_worker(proxied) as worker:
                # A first score leaves the worker's pool holding a connection that the cut kills.
                first = score_message()
                await broker.publish_scores([first])
                await wait_until(lambda: worker.persisted == 1, "the first score stored")

                await proxy.cut()
                scores = _scores(300)
                await broker.publish_scores(scores)
                assert await broker.wait_for_ready_count(QUEUE, 0) == 0
                await wait_until(
                    lambda: _store_retries(caplog) >= 4, "the worker retried the database 4 times"
                )
                assert await db.fetchval(COUNT_SCORES) == 1
                assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

                await proxy.restore()
                assert await wait_for_count(db, COUNT_SCORES, 301, timeout=15) == 301
                await wait_until(lambda: worker.persisted == 301, "the worker stored every score")
                assert worker.duplicates == 0
            await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, [first, *scores])


def _store_retries(caplog: pytest.LogCaptureFixture) -> int:
    return sum(
        1
        for record in caplog.records
        if record.name == "worker.pipeline" and record.getMessage().startswith(STORE_RETRY_LOG)
    )


async def test_broker_connection_lost_mid_batch_is_recovered_without_loss_or_duplicates(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = _scores(200)
    async with (
        connect_broker(settings) as broker,
        TcpProxy.for_url(settings.amqp_url) as proxy,
    ):
        proxied = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        async with running_worker(proxied) as worker:
            async with scores_table_locked(db):
                await broker.publish_scores(scores)
                assert await broker.wait_for_ready_count(QUEUE, 0) == 0
                assert await wait_for_lock_waiters(db, 1) >= 1
                # The broker takes back everything the worker held; its acks can no longer land.
                await proxy.cut()
                assert await broker.wait_for_ready_count(QUEUE, 200) == 200
            await proxy.restore()
            assert await wait_for_count(db, COUNT_SCORES, 200) == 200
            await wait_until(
                lambda: worker.duplicates >= 200, "the redelivered scores seen as duplicates"
            )
        assert worker.persisted == 200
        await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, scores)


async def test_worker_killed_mid_batch_loses_and_duplicates_nothing(
    settings: Settings, db: asyncpg.Connection
) -> None:
    # A window smaller than the worker's starting one, so that it never changes.
    small_window = settings.model_copy(update={"worker_prefetch": 50, "worker_batch_size": 25})
    scores = _scores(300)
    async with connect_broker(settings) as broker:
        async with scores_table_locked(db):
            async with worker_process(small_window) as doomed:
                await broker.publish_scores(scores)
                # The worker holds its prefetch window, and its INSERT waits on our lock.
                assert await broker.wait_for_ready_count(QUEUE, 250) == 250
                assert await wait_for_lock_waiters(db, 1) >= 1
                assert await doomed.kill() == -signal.SIGKILL
            assert await broker.wait_for_ready_count(QUEUE, 300) == 300
        # Released: the dead worker's INSERT may still commit on the server; no matter.
        async with worker_process(small_window) as successor:
            assert await wait_for_count(db, COUNT_SCORES, 300, timeout=20) == 300
            await _stop_when_idle(successor)
        await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, scores)


async def test_sigterm_finishes_the_batch_in_hand_and_exits_cleanly(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = _scores(200)
    async with connect_broker(settings) as broker, worker_process(settings) as worker:
        async with scores_table_locked(db):
            await broker.publish_scores(scores)
            assert await broker.wait_for_ready_count(QUEUE, 0) == 0
            assert await wait_for_lock_waiters(db, 1) >= 1
            worker.send_signal(signal.SIGTERM)
            await worker.wait_for_output("stop requested")
            assert worker.returncode is None
        code = await worker.wait(timeout=settings.worker_shutdown_grace_seconds)
        assert code == 0, worker.output
        assert "worker stopped: 200 persisted, 0 duplicates" in worker.output
        assert "grace period over" not in worker.output
        assert await db.fetchval(COUNT_SCORES) == 200
        # Stored and acked before the exit: nothing may come back for redelivery.
        await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, scores)


async def test_sigterm_past_the_grace_period_returns_the_messages_to_the_queue(
    settings: Settings, db: asyncpg.Connection
) -> None:
    short_grace = settings.model_copy(update={"worker_shutdown_grace_seconds": 1})
    scores = _scores(100)
    async with connect_broker(settings) as broker:
        async with scores_table_locked(db), worker_process(short_grace) as worker:
            await broker.publish_scores(scores)
            assert await broker.wait_for_ready_count(QUEUE, 0) == 0
            assert await wait_for_lock_waiters(db, 1) >= 1
            worker.send_signal(signal.SIGTERM)
            # PostgreSQL stays blocked, so the worker gives up the batch when the grace ends.
            assert await worker.wait(timeout=1 + 4) == 0
            assert "grace period over" in worker.output
            assert await broker.wait_for_ready_count(QUEUE, 100) == 100
        async with worker_process(settings) as successor:
            assert await wait_for_count(db, COUNT_SCORES, 100, timeout=20) == 100
            await _stop_when_idle(successor)
        await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, scores)


async def test_a_crash_loop_while_postgres_is_stuck_still_stores_each_score_once(
    settings: Settings, db: asyncpg.Connection
) -> None:
    scores = _scores(150)
    crashes = 3
    async with connect_broker(settings) as broker:
        async with scores_table_locked(db):
            await broker.publish_scores(scores)
            for crash in range(1, crashes + 1):
                async with worker_process(settings) as worker:
                    assert await broker.wait_for_ready_count(QUEUE, 0) == 0
                    # Each killed worker leaves its INSERTs (one or two) waiting on the server.
                    assert await wait_for_lock_waiters(db, crash) >= crash
                    assert await worker.kill() == -signal.SIGKILL
                assert await broker.wait_for_ready_count(QUEUE, 150) == 150
        async with worker_process(settings) as survivor:
            assert await wait_for_count(db, COUNT_SCORES, 150, timeout=20) == 150
            await _stop_when_idle(survivor)
        await _assert_nothing_left(broker)
    await _assert_stored_exactly_once(db, scores)


async def test_a_worker_told_to_stop_while_the_broker_is_unreachable_still_exits(
    settings: Settings,
) -> None:
    # running_worker fails the test if the worker takes over 15 s to stop; the outer bound
    # turns a worker that never stops into a failure too, not a hang.
    async with asyncio.timeout(30), TcpProxy.for_url(settings.amqp_url) as proxy:
        proxied = settings.model_copy(update={"amqp_url": proxy.url_through(settings.amqp_url)})
        async with running_worker(proxied) as worker:
            await proxy.cut()  # and never restored: the robust connection keeps retrying
            await wait_for_status(worker, "/readyz", 503, timeout=10)
