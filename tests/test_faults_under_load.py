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
from types import TracebackType
from typing import Any, Self

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
from shared.topology import DEAD_LETTER_QUEUE, QUEUE
from tests.conftest import ENTITY, PROJECT, basic_auth, score_body
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    Broker,
    CliProcess,
    api_process,
    connect_broker,
    score_message,
    wait_until,
    worker_process,
)
from tests.support.rabbitmq_node import RabbitMQNode, rabbitmq_node
from tests.support.tcp_proxy import TcpProxy

SCORES_PATH = f"/v2/{ENTITY}/{PROJECT}/scores"
CLIENTS = 20
# After a refusal a client pauses this long (a real one would honour Retry-After; a short
# pause keeps many answers coming while the fault lasts).
PAUSE_AFTER_REFUSAL_SECONDS = 0.05
REQUEST_TIMEOUT_SECONDS = 15.0
# A refusal needs no broker round trip once the API knows the broker is gone.
PROMPT_SECONDS = 1.0
PROGRESS_SECONDS = 20.0
DRAIN_SECONDS = 30.0
COUNT_SCORES = "SELECT count(*) FROM scores"
COUNT_AMONG = "SELECT count(*) FROM scores WHERE score_id = ANY($1::uuid[])"
COUNT_LOCK_WAITERS = (
    "SELECT count(*) FROM pg_locks WHERE relation = 'scores'::regclass AND NOT granted"
)
BROKER_DOWN_SECONDS = 2.0


@dataclass(frozen=True)
class Outcome:
    """One POST: when it was sent and answered (event loop clock) and what came back."""

    sent: float
    answered: float
    status: int | None  # None: no HTTP answer at all
    score_id: str | None
    retry_after: str | None
    detail: str

    @property
    def seconds(self) -> float:
        """How long the API took to answer."""
        return self.answered - self.sent


class LoadGenerator:
    """CLIENTS concurrent clients posting scores to one API until stopped, keeping every answer."""

    def __init__(self, base_url: str, key: str, clients: int = CLIENTS) -> None:
        self._client = httpx.AsyncClient(
            base_url=base_url,
            timeout=REQUEST_TIMEOUT_SECONDS,
            limits=httpx.Limits(max_connections=clients, max_keepalive_connections=clients),
        )
        self._headers = basic_auth(key)
        self._clients = clients
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: list[Outcome] = []

    async def __aenter__(self) -> Self:
        self._tasks = [
            asyncio.create_task(self._post_continuously(n)) for n in range(self._clients)
        ]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Stop posting; returns once every request in flight was answered (or failed)."""
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._client.aclose()

    def accepted_ids(self) -> list[str]:
        """The score_id of every 200."""
        return [o.score_id for o in self.outcomes if o.score_id is not None]

    def statuses(self) -> Counter[int | None]:
        """How many answers of each status (None: no answer)."""
        return Counter(o.status for o in self.outcomes)

    def sent_since(self, since: float) -> list[Outcome]:
        """The answers to posts sent at or after `since`."""
        return [o for o in self.outcomes if o.sent >= since]

    async def wait_for_accepted(self, count: int, since: float = 0.0) -> None:
        """Wait until `count` posts sent at or after `since` were answered 200."""
        await wait_until(
            lambda: sum(o.status == 200 for o in self.sent_since(since)) >= count,
            f"{count} scores accepted (answers so far: {dict(self.statuses())})",
            timeout=PROGRESS_SECONDS,
        )

    async def wait_for_answers(self, count: int, since: float) -> None:
        """Wait until `count` posts sent at or after `since` were answered, whatever the status."""
        await wait_until(
            lambda: len(self.sent_since(since)) >= count,
            f"{count} answers (answers so far: {dict(self.statuses())})",
            timeout=PROGRESS_SECONDS,
        )

    async def _post_continuously(self, client: int) -> None:
        loop = asyncio.get_running_loop()
        posted = 0
        while not self._stop.is_set():
            posted += 1
            body = score_body(prediction_id=f"load-{client}-{posted}", value=posted)
            sent = loop.time()
            try:
                response = await self._client.post(SCORES_PATH, json=body, headers=self._headers)
            except httpx.HTTPError as exc:
                self.outcomes.append(Outcome(sent, loop.time(), None, None, None, repr(exc)))
                await asyncio.sleep(PAUSE_AFTER_REFUSAL_SECONDS)
                continue
            ok = response.status_code == 200
            self.outcomes.append(
                Outcome(
                    sent=sent,
                    answered=loop.time(),
                    status=response.status_code,
                    score_id=response.json()["score_id"] if ok else None,
                    retry_after=response.headers.get("Retry-After"),
                    detail="" if ok else response.text,
                )
            )
            if not ok:
                await asyncio.sleep(PAUSE_AFTER_REFUSAL_SECONDS)


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


async def assert_stored_exactly_once(
    db: asyncpg.Connection, expected: list[str], unanswered_allowed: int = 0
) -> None:
    """Each expected score_id becomes one row (waiting for the queue to drain); no strays.

    `unanswered_allowed` admits rows for posts answered 503 while the broker may still have
    kept the score (the connection dropped, or the confirm timed out, after the publish).
    """
    assert len(set(expected)) == len(expected), "a score_id was answered twice"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_SECONDS
    while (stored := await db.fetchval(COUNT_AMONG, expected)) < len(expected):
        assert loop.time() < deadline, f"{stored} of {len(expected)} scores stored"
        await asyncio.sleep(0.1)
    rows = [str(row["score_id"]) for row in await db.fetch("SELECT score_id FROM scores")]
    assert len(rows) == len(set(rows))
    strays = set(rows) - set(expected)
    assert len(strays) <= unanswered_allowed, (
        f"{len(strays)} rows nobody was answered 200 for (allowed: {unanswered_allowed})"
    )


async def stop_cleanly(worker: CliProcess) -> None:
    """SIGTERM a worker that has stored everything; it must exit 0."""
    worker.send_signal(signal.SIGTERM)
    assert await worker.wait(timeout=15) == 0, worker.output


async def assert_queues_empty(broker: Broker) -> None:
    """Nothing left for redelivery and nothing dead-lettered."""
    await broker.assert_stays_empty(QUEUE)
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
            # The cut aborts connections; let a commit that raced it land before counting.
            await asyncio.sleep(0.5)
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


@pytest.fixture
def own_node() -> Iterator[RabbitMQNode]:
    """A RabbitMQ node of this test's own, to stop and start."""
    with rabbitmq_node() as node:
        yield node


async def test_broker_restarted_under_load_gets_prompt_503s_then_stores_every_200(
    settings: Settings, own_node: RabbitMQNode, db: asyncpg.Connection, api_key: str
) -> None:
    loop = asyncio.get_running_loop()
    on_node = settings.model_copy(update={"amqp_url": own_node.amqp_url})
    async with (
        api_process(on_node) as api,
        worker_process(on_node) as worker,
        httpx.AsyncClient(base_url=api.base_url, timeout=5) as probe,
    ):
        async with LoadGenerator(api.base_url, api_key) as load:
            await wait_for_rows(db, at_least=100)
            await own_node.stop_app()
            stopped = loop.time()
            down_readyz = (await probe.get("/readyz")).status_code
            await asyncio.sleep(BROKER_DOWN_SECONDS)
            starting = loop.time()
            await own_node.start_app()
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
                await asyncio.sleep(0.3)
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
