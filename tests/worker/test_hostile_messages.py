"""A bad message is isolated, never contagious: whatever a direct publisher sends, it ends in
scores.dead with a reason, the worker keeps going, and no other message spends a delivery.

The hostile messages are written byte for byte (tests/support/raw_amqp.py): header strings
that are not UTF-8, header tables nested 3000 levels deep, properties no client converts.
"""

import asyncio
import subprocess
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import asyncpg
import pytest

from cli._dead_letters import describe
from shared.contract import MESSAGE_TYPE
from shared.dead_letters import DETAIL_HEADER, REASON_HEADER, DeadLetterReason
from shared.settings import Settings
from shared.topology import EXCHANGE, QUEUE, ROUTING_KEY
from tests.conftest import wait_for_count
from tests.support.messages import to_amqp_message
from tests.support.processes import (
    connect_broker,
    running_worker,
    score_message,
    wait_until,
)
from tests.support.raw_amqp import (
    RawMessage,
    field_table,
    long_string,
    nested_table,
    publish_raw,
    raw_message,
)
from tests.support.tcp_proxy import TcpProxy
from tests.worker.test_health_and_metrics import Samples, get, sample, scrape, wait_for_status
from worker.worker import ScoreWorker

COUNT_SCORES = "SELECT count(*) FROM scores"
LOSSES = "score_ingest_consumer_connection_losses_total"
REDELIVERED = "score_ingest_messages_redelivered_total"
FALLBACKS = "score_ingest_dead_letter_fallbacks_total"
CAUTIOUS = "score_ingest_worker_cautious"

_NOT_UTF8_HEADER = field_table([(b"bad", long_string(b"a\xffb"))])
_NOT_UTF8_KEY = field_table([(b"\xff\xfe", long_string(b"v"))])
_DEEP_HEADER = field_table([(b"k", nested_table(3000))])


@dataclass(frozen=True)
class Hostile:
    """A message written byte for byte, and what must become of it (None: stored)."""

    name: str
    properties: dict[str, Any]
    valid_body: bool
    reason: DeadLetterReason | None

    def message(self, body: bytes) -> RawMessage:
        """The message on the wire, its message_id naming the case."""
        return raw_message(body, message_id=f"hostile-{self.name}".encode(), **self.properties)


def _hostile(
    name: str, reason: DeadLetterReason | None, *, valid_body: bool = True, **properties: Any
) -> Hostile:
    return Hostile(name, properties, valid_body, reason)


_TYPE = MESSAGE_TYPE.encode()
HOSTILE = [
    _hostile(
        "not-utf8-header-refused-body",
        DeadLetterReason.INVALID_JSON,
        valid_body=False,
        headers=_NOT_UTF8_HEADER,
    ),
    _hostile("not-utf8-header-valid-body", None, headers=_NOT_UTF8_HEADER, message_type=_TYPE),
    _hostile(
        "not-utf8-key-refused-body",
        DeadLetterReason.INVALID_JSON,
        valid_body=False,
        headers=_NOT_UTF8_KEY,
    ),
    _hostile(
        "deep-header-refused-body",
        DeadLetterReason.INVALID_JSON,
        valid_body=False,
        headers=_DEEP_HEADER,
    ),
    _hostile("deep-header-valid-body", None, headers=_DEEP_HEADER, message_type=_TYPE),
    _hostile(
        "not-utf8-type", DeadLetterReason.UNSUPPORTED_MESSAGE_TYPE, message_type=_TYPE + b"\xff"
    ),
    _hostile(
        "not-utf8-content-type",
        DeadLetterReason.UNSUPPORTED_CONTENT_TYPE,
        content_type=b"application/json\xff",
    ),
    _hostile("timestamp-past-any-datetime", None, timestamp=2**63, message_type=_TYPE),
]


def _delta(later: Samples, earlier: Samples, name: str, **labels: str) -> float:
    return sample(later, name, **labels) - sample(earlier, name, **labels)


async def test_headers_and_properties_no_client_reads_cost_no_other_message_a_delivery(
    settings: Settings, db: asyncpg.Connection
) -> None:
    good = [score_message(prediction_id=f"good-{i}") for i in range(len(HOSTILE) + 1)]
    stored_hostile = {h.name: score_message(prediction_id=h.name) for h in HOSTILE}
    async with connect_broker(settings) as broker:
        # Published before the worker starts, so hostile and good messages share its batches.
        for i, score in enumerate(good):
            await broker.publish([to_amqp_message(score)])
            if i < len(HOSTILE):
                hostile = HOSTILE[i]
                body = (
                    stored_hostile[hostile.name].model_dump_json().encode()
                    if hostile.valid_body
                    else b"{not json"
                )
                await publish_raw(settings.amqp_url, EXCHANGE, ROUTING_KEY, [hostile.message(body)])
        assert await broker.wait_for_ready_count(QUEUE, len(good) + len(HOSTILE)) == len(
            good
        ) + len(HOSTILE)

        async with running_worker(settings) as worker:
            before = await scrape(worker)
            expected_rows = len(good) + sum(1 for h in HOSTILE if h.reason is None)
            assert await wait_for_count(db, COUNT_SCORES, expected_rows) == expected_rows
            dead_expected = [h for h in HOSTILE if h.reason is not None]
            dead = await broker.take_dead_letters(len(dead_expected))
            await broker.assert_stays_empty(QUEUE)
            after = await scrape(worker)
            assert (await get(worker, "/readyz")).status_code == 200
        assert await broker.take_dead_letters(1, timeout=0.2) == []

    stored = {row["score_id"] for row in await db.fetch("SELECT score_id FROM scores")}
    assert stored == {s.score_id for s in good} | {
        stored_hostile[h.name].score_id for h in HOSTILE if h.reason is None
    }
    by_id = {str(letter.message_id): letter for letter in dead}
    assert sorted(by_id) == sorted(f"hostile-{h.name}" for h in dead_expected)
    for hostile in dead_expected:
        letter = by_id[f"hostile-{hostile.name}"]
        assert letter.headers[REASON_HEADER] == hostile.reason, (hostile.name, letter.headers)
        assert letter.headers[DETAIL_HEADER], hostile.name
    # The publisher's headers travel with the dead letter, as text that can be read.
    assert by_id["hostile-not-utf8-header-refused-body"].headers["bad"] == "a\\xffb"

    # Nothing was redelivered: no connection was lost, no delivery spent, no fallback taken.
    assert _delta(after, before, LOSSES, cause="unexplained") == 0
    assert _delta(after, before, LOSSES, cause="broker") == 0
    assert _delta(after, before, REDELIVERED) == 0
    assert _delta(after, before, FALLBACKS) == 0


@pytest.fixture
def limited(settings: Settings, bare_vhost: str) -> Settings:
    """Settings whose queue dead-letters at the third delivery."""
    return settings.model_copy(update={"queue_delivery_limit": 2, "worker_prefetch": 200})


async def test_a_message_that_kills_the_connection_is_isolated_and_spends_no_one_elses_deliveries(
    limited: Settings, db: asyncpg.Connection
) -> None:
    """The culprit drops every connection it travels on. Without isolation the window it
    arrives in is redelivered with it, three times, and the delivery limit (2) would
    dead-letter every score in that window; with it, only the culprit goes."""
    marker = b"CULPRIT-b8f1c0de"
    good = [score_message(prediction_id=f"good-{i}") for i in range(60)]
    culprit = score_message(prediction_id=marker.decode())
    async with connect_broker(limited) as broker, TcpProxy.for_url(limited.amqp_url) as proxy:
        await broker.publish_scores([*good[:30], culprit, *good[30:]])
        proxy.fatal = marker
        proxied = limited.model_copy(update={"amqp_url": proxy.url_through(limited.amqp_url)})
        async with running_worker(proxied) as worker:
            assert await wait_for_count(db, COUNT_SCORES, len(good), timeout=30) == len(good)
            (dead,) = await broker.take_dead_letters(1, timeout=20)
            await wait_until(lambda: not worker_cautious(worker), "the full window again", 10)
            samples = await scrape(worker)
        await broker.assert_stays_empty(QUEUE)
        assert await broker.take_dead_letters(1, timeout=0.2) == []
    assert proxy.dropped == limited.queue_delivery_limit + 1
    letter = describe(dead)
    assert letter.reason == "delivery_limit"
    assert letter.id == str(culprit.score_id)
    assert sample(samples, LOSSES, cause="unexplained") >= proxy.dropped
    stored = {row["score_id"] for row in await db.fetch("SELECT score_id FROM scores")}
    assert stored == {score.score_id for score in good}


def worker_cautious(worker: ScoreWorker) -> bool:
    """Whether the worker is taking one message at a time."""
    return bool(worker._consumer.cautious)


async def test_a_connection_the_broker_closes_is_no_reason_for_caution(
    settings: Settings, db: asyncpg.Connection
) -> None:
    vhost = unquote(urlsplit(settings.amqp_url).path.lstrip("/"))
    async with connect_broker(settings) as broker, running_worker(settings) as worker:
        before = await scrape(worker)
        listed = await asyncio.to_thread(
            _rabbitmqctl,
            "list_connections",
            "--no-table-headers",
            "pid",
            "vhost",
            "client_properties",
        )
        # Erlang terms: the pid, the vhost, then client_properties, where the consuming
        # connection's name is "score-ingest-worker" (the other one's has a suffix).
        pids = [
            line.split("\t")[0]
            for line in listed.splitlines()
            if line.split("\t")[1:2] == [vhost]
            and '{"connection_name","score-ingest-worker"}' in line
        ]
        assert len(pids) == 1, listed
        await asyncio.to_thread(_rabbitmqctl, "close_connection", pids[0], "operator says so")
        await wait_until(lambda: not worker._consumer.connected, "the consumer noticed", 10)
        await wait_until(lambda: worker._consumer.connected, "the consumer is back", 10)
        assert not worker_cautious(worker)
        after = await scrape(worker)
        assert _delta(after, before, LOSSES, cause="broker") == 1
        assert _delta(after, before, LOSSES, cause="unexplained") == 0
        assert sample(after, CAUTIOUS) == 0

        scores = [score_message(prediction_id=f"after-{i}") for i in range(5)]
        await broker.publish_scores(scores)
        assert await wait_for_count(db, COUNT_SCORES, len(scores)) == len(scores)


def _rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, check=True, text=True, timeout=60
    )
    return result.stdout


async def test_readyz_says_so_while_the_worker_holds_messages_it_cannot_store(
    settings: Settings, db: asyncpg.Connection
) -> None:
    stalling = settings.model_copy(update={"worker_stall_seconds": 1})
    score = score_message()
    async with connect_broker(settings) as broker, running_worker(stalling) as worker:
        await wait_for_status(worker, "/readyz", 200, timeout=5)
        # PostgreSQL answers, but every INSERT waits behind this lock: no progress.
        await db.execute("BEGIN; LOCK TABLE scores IN ACCESS EXCLUSIVE MODE")
        try:
            await broker.publish_scores([score])
            await wait_for_status(worker, "/readyz", 503, timeout=5)
            assert (await get(worker, "/healthz")).status_code == 200
        finally:
            await db.execute("ROLLBACK")
        await wait_for_status(worker, "/readyz", 200, timeout=5)
        assert await wait_for_count(db, COUNT_SCORES, 1) == 1


async def test_a_delivery_mode_no_client_reads_never_reaches_the_worker(
    settings: Settings,
) -> None:
    """RabbitMQ refuses delivery modes other than 1 and 2 at publish (PRECONDITION_FAILED), and
    pamqp itself refuses to build such properties: the one property seen to make aio-pika's
    IncomingMessage raise cannot reach a consumer. Should another one, the consumer hands the
    delivery on with its unreadable properties left out, to be dead-lettered as
    `invalid_properties` (worker/consumer.py)."""
    with pytest.raises(AssertionError, match="delivery_mode"):
        await publish_raw(
            settings.amqp_url, EXCHANGE, ROUTING_KEY, [raw_message(b"{}", delivery_mode=3)]
        )
