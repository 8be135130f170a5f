"""Faults under load: nothing answered 200 is lost or stored twice, whatever breaks meanwhile.

A real `score-ingest api` and real workers run as subprocesses while twenty HTTP clients
post scores continuously and record every answer. Then something fails: workers are
SIGKILLed, PostgreSQL is cut off, the broker's RabbitMQ application is stopped and started,
or a direct publisher mixes garbage into the queue. Afterwards every score_id answered 200
must be exactly one row, and the only answers besides 200 must be the 503s the fault
allows. The machine's shared servers are never touched: PostgreSQL is cut through a
TcpProxy, and the broker that restarts is a node of the test's own.
"""

import asyncio
import contextlib
import json
import signal
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from shared.contract import CONTENT_TYPE, MESSAGE_TYPE, ScoreMessage
from shared.dead_letters import (
    DETAIL_HEADER,
    QUEUE_HEADER,
    REASON_HEADER,
    TIME_HEADER,
    DeadLetterReason,
)
from shared.settings import Settings
from shared.topology import DEAD_LETTER_QUEUE, QUEUE, persist_queues
from tests.support.load import (
    CLIENTS,
    DRAIN_SECONDS,
    PROGRESS_SECONDS,
    LoadGenerator,
    assert_stored_exactly_once,
)
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    Broker,
    CliProcess,
    api_process,
    connect_broker,
    score_message,
    worker_process,
)
from tests.support.rabbitmq_node import RabbitMQNode, rabbitmq_node
from tests.support.tcp_proxy import TcpProxy

# A refusal needs no broker round trip once the API knows the broker is gone.
PROMPT_SECONDS = 1.0
COUNT_SCORES = "SELECT count(*) FROM scores"
COUNT_OTHER_SESSIONS = """
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND backend_type = 'client backend'
AND pid <> pg_backend_pid()
"""
COUNT_LOCK_WAITERS = (
    "SELECT count(*) FROM pg_locks WHERE relation = 'scores'::regclass AND NOT granted"
)
BROKER_DOWN_SECONDS = 2.0


def assert_only_200s(load: LoadGenerator) -> None:
    """The fault was one the API must not even notice."""
    refused = [o for o in load.outcomes if o.status != 200]
    assert not refused, f"answers besides 200: {dict(load.statuses())}; first: {refused[:3]}"


def assert_only_200s_and_503s(load: LoadGenerator) -> None:
    """Every answer a 200 or an actionable 503, within the publish timeout."""
    for outcome in load.outcomes:
        assert outcome.status in (200, 503), (outcome, dict(load.statuses()))
        if outcome.status == 503:
            assert outcome.retry_after is not None, outcome
            assert int(outcome.retry_after) >= 1, outcome


async def count_rows(db: asyncpg.Connection) -> int:
    """Rows in scores right now."""
    count: int = await db.fetchval(COUNT_SCORES)
    return count


async def wait_for_proxied_sessions_to_end(db: asyncpg.Connection) -> None:
    """Wait until no session but ours is left on the database (the others came through a proxy
    that was cut, and a session ends only after the statement it was running)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROGRESS_SECONDS
    while (others := await db.fetchval(COUNT_OTHER_SESSIONS)) > 0:
        assert loop.time() < deadline, f"{others} sessions outlived the cut"
        await asyncio.sleep(0.02)


async def wait_for_rows(db: asyncpg.Connection, at_least: int) -> None:
    """Wait until the workers stored at least this many rows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROGRESS_SECONDS
    while (count := await count_rows(db)) < at_least:
        assert loop.time() < deadline, f"{count} rows, not {at_least}, in {PROGRESS_SECONDS}s"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def scores_table_locked(db: asyncpg.Connection) -> AsyncIterator[None]:
    """Hold an ACCESS EXCLUSIVE lock on scores, so that every INSERT waits until the block ends."""
    await db.execute("BEGIN; LOCK TABLE scores IN ACCESS EXCLUSIVE MODE")
    try:
        yield
    finally:
        await db.execute("ROLLBACK")


async def wait_for_blocked_inserts(db: asyncpg.Connection, count: int) -> None:
    """Wait until `count` sessions wait for a lock on scores (workers stuck behind ours)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PROGRESS_SECONDS
    while (waiting := await db.fetchval(COUNT_LOCK_WAITERS)) < count:
        assert loop.time() < deadline, f"{waiting} sessions wait on scores, not {count}"
        await asyncio.sleep(0.02)


async def stop_cleanly(worker: CliProcess) -> None:
    """SIGTERM a worker that has stored everything; it must exit 0."""
    worker.send_signal(signal.SIGTERM)
    assert await worker.wait(timeout=15) == 0, worker.output


async def assert_queues_empty(broker: Broker) -> None:
    """Nothing left for redelivery (in scores.persist or a shard) and nothing dead-lettered."""
    for name in persist_queues(Settings()):
        await broker.assert_stays_empty(name)
    assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0


async def test_workers_sigkilled_twice_under_load_lose_and_duplicate_nothing(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    async with (
        connect_broker(settings) as broker,
        api_process(settings) as api,
        LoadGenerator(api.base_url, api_key) as load,
    ):
        for _ in range(2):
            async with worker_process(settings) as doomed:
                await wait_for_rows(db, at_least=await count_rows(db) + 50)
                # Killed with a batch in hand: its INSERT waits on our lock, its acks unsent.
                async with scores_table_locked(db):
                    await wait_for_blocked_inserts(db, 1)
                    assert await doomed.kill() == -signal.SIGKILL
            killed_at = asyncio.get_running_loop().time()
            # Nobody consumes now; the API must keep accepting into the queue.
            await load.wait_for_accepted(50, since=killed_at)
        async with worker_process(settings) as survivor:
            await wait_for_rows(db, at_least=await count_rows(db) + 50)
            await load.stop()
            await assert_stored_exactly_once(db, load.accepted_ids())
            await stop_cleanly(survivor)
        await assert_queues_empty(broker)
    assert_only_200s(load)


async def test_postgres_cut_under_load_keeps_the_api_accepting_and_the_worker_catches_up(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    loop = asyncio.get_running_loop()
    async with TcpProxy.for_url(settings.database_url) as proxy:
        # Both processes reach PostgreSQL only through the proxy. A short auth cache makes
        # the API fall back on what it last knew about the key while the database is gone.
        cut_off = settings.model_copy(
            update={
                "database_url": proxy.url_through(settings.database_url),
                "auth_cache_ttl_seconds": 0.5,
            }
        )
        async with (
            connect_broker(settings) as broker,
            api_process(cut_off) as api,
            worker_process(cut_off) as worker,
            LoadGenerator(api.base_url, api_key) as load,
        ):
            await wait_for_rows(db, at_least=100)
            await proxy.cut()
            cut_at = loop.time()
            # The cut aborts connections; a commit that raced it lands before its session ends.
            await wait_for_proxied_sessions_to_end(db)
            rows_at_cut = await count_rows(db)
            await asyncio.sleep(3.5)
            assert await count_rows(db) == rows_at_cut, "stored while PostgreSQL was cut off"
            accepted_during_cut = sum(o.status == 200 for o in load.sent_since(cut_at))
            assert accepted_during_cut >= 100
            assert await broker.ready_count(DEAD_LETTER_QUEUE) == 0

            await proxy.restore()
            await load.wait_for_accepted(50, since=loop.time())
            await load.stop()
            await assert_stored_exactly_once(db, load.accepted_ids())
            assert "retrying" in worker.output, "the worker never retried the database"
            await stop_cleanly(worker)
            await assert_queues_empty(broker)
    assert_only_200s(load)


@pytest.fixture(scope="module", autouse=True)
def booting_node() -> Iterator[RabbitMQNode]:
    """A RabbitMQ node of this module's own, started with the module's first test: it boots
    (5-10 s) while the tests before the one that stops and starts it run."""
    with rabbitmq_node(booted=False) as node:
        yield node


@pytest.fixture
def booted_node(booting_node: RabbitMQNode) -> RabbitMQNode:
    """The module's node, once it has booted."""
    booting_node.wait_until_listening()
    return booting_node


async def test_broker_restarted_under_load_gets_prompt_503s_then_stores_every_200(
    settings: Settings, booted_node: RabbitMQNode, db: asyncpg.Connection, api_key: str
) -> None:
    loop = asyncio.get_running_loop()
    on_node = settings.model_copy(update={"amqp_url": booted_node.amqp_url})
    async with (
        api_process(on_node) as api,
        worker_process(on_node) as worker,
        httpx.AsyncClient(base_url=api.base_url, timeout=5) as probe,
    ):
        async with LoadGenerator(api.base_url, api_key) as load:
            await wait_for_rows(db, at_least=100)
            await booted_node.stop_app()
            stopped = loop.time()
            down_readyz = (await probe.get("/readyz")).status_code
            await asyncio.sleep(BROKER_DOWN_SECONDS)
            starting = loop.time()
            await booted_node.start_app()
            await load.wait_for_accepted(100, since=loop.time())
        assert api.process.returncode is None, "the api process did not survive the restart"
        down = [o for o in load.sent_since(stopped) if o.answered < starting]
        # Posts in flight when the broker dropped the connection may or may not be stored.
        uncertain = sum(o.status != 200 for o in load.outcomes if o.sent < stopped)
        await assert_stored_exactly_once(db, load.accepted_ids(), unanswered_allowed=uncertain)
        await stop_cleanly(worker)
    async with connect_broker(on_node) as broker:
        await assert_queues_empty(broker)

    assert_only_200s_and_503s(load)
    assert down_readyz == 503
    assert len(down) >= CLIENTS, f"only {len(down)} answers while the broker was down"
    for outcome in down:
        assert outcome.status == 503, outcome
        assert outcome.seconds < PROMPT_SECONDS, outcome
    for outcome in load.outcomes:
        assert outcome.seconds < on_node.publish_timeout_seconds + 1, outcome


@dataclass(frozen=True)
class Garbage:
    """A message no worker can store, and the reason its dead letter must give."""

    case: str
    body: bytes
    reason: DeadLetterReason
    detail_mentions: str = ""
    content_type: str = CONTENT_TYPE
    type: str = MESSAGE_TYPE

    def message(self, round_: int) -> aio_pika.Message:
        """The AMQP message, labelled so that its dead letter can be matched to it."""
        return aio_pika.Message(
            body=self.body,
            content_type=self.content_type,
            type=self.type,
            message_id=f"garbage-{self.case}-{round_}",
            headers={"x-test-case": self.case},
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )


def _score_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = json.loads(score_message().model_dump_json())
    fields.update(changes)
    return fields


def _without_score_id() -> bytes:
    fields = _score_fields()
    del fields["score_id"]
    return json.dumps(fields).encode()


GARBAGE = [
    Garbage("not-json", b'{"score_id": "01', DeadLetterReason.INVALID_JSON),
    Garbage(
        "wrong-types",
        json.dumps(_score_fields(created_at="yesterday", prediction_id=42)).encode(),
        DeadLetterReason.SCHEMA_VIOLATION,
        detail_mentions="created_at",
    ),
    Garbage(
        "missing-score-id",
        _without_score_id(),
        DeadLetterReason.SCHEMA_VIOLATION,
        detail_mentions="score_id",
    ),
    Garbage(
        "wrong-content-type",
        json.dumps(_score_fields()).encode(),
        DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
        detail_mentions="text/plain",
        content_type="text/plain",
    ),
    Garbage(
        "wrong-message-type",
        json.dumps(_score_fields()).encode(),
        DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE,
        detail_mentions="score.delete.v1",
        type="score.delete.v1",
    ),
]
GARBAGE_ROUNDS = 4


async def test_garbage_from_a_direct_publisher_under_load_is_dead_lettered_with_reasons(
    settings: Settings, db: asyncpg.Connection, api_key: str
) -> None:
    good: list[ScoreMessage] = []
    async with (
        connect_broker(settings) as broker,
        api_process(settings) as api,
        worker_process(settings) as worker,
    ):
        async with LoadGenerator(api.base_url, api_key) as load:
            for round_ in range(GARBAGE_ROUNDS):
                batch: list[aio_pika.Message] = []
                for garbage in GARBAGE:
                    score = score_message(prediction_id=f"direct-{round_}-{garbage.case}")
                    good.append(score)
                    batch += [to_amqp_message(score), garbage.message(round_)]
                await broker.publish(batch)
                # The next round once the api has taken a share of the load: garbage and good
                # scores keep reaching the worker together.
                await load.wait_for_accepted(50, since=asyncio.get_running_loop().time())
            await load.wait_for_accepted(200)
        expected = load.accepted_ids() + [str(score.score_id) for score in good]
        await assert_stored_exactly_once(db, expected)
        dead = await broker.take_dead_letters(len(GARBAGE) * GARBAGE_ROUNDS, timeout=DRAIN_SECONDS)
        await stop_cleanly(worker)
        await assert_queues_empty(broker)

    assert_only_200s(load)
    by_case = {garbage.case: garbage for garbage in GARBAGE}
    seen = Counter(_assert_dead_letter(letter, by_case) for letter in dead)
    assert seen == dict.fromkeys(by_case, GARBAGE_ROUNDS)


def _assert_dead_letter(letter: AbstractIncomingMessage, by_case: dict[str, Garbage]) -> str:
    """Check one dead letter against the garbage it came from; returns its case."""
    headers = letter.headers
    case = str(headers["x-test-case"])
    garbage = by_case[case]
    assert headers[REASON_HEADER] == garbage.reason.value, (case, headers)
    detail = str(headers[DETAIL_HEADER])
    assert detail, (case, headers)
    assert garbage.detail_mentions in detail, (case, detail)
    assert headers[QUEUE_HEADER] == QUEUE
    datetime.fromisoformat(str(headers[TIME_HEADER]))
    assert letter.body == garbage.body
    assert letter.message_id is not None
    assert letter.message_id.startswith(f"garbage-{case}-")
    return case
