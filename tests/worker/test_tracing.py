"""The worker's store span links to the trace context each message carries, whoever published
it (README "Tracing", "Message contract")."""

import os

import aio_pika
import asyncpg

from shared.settings import Settings
from shared.tracing import MAX_LINKS, TRACEPARENT_HEADER, TRACEPARENTS_HEADER
from tests.conftest import wait_for_count
from tests.support.messages import to_amqp_message
from tests.support.otlp import OtlpReceiver, ReceivedSpan
from tests.support.processes import connect_broker, running_worker, score_message

COUNT_SCORES = "SELECT count(*) FROM scores"


def _context() -> tuple[str, str]:
    return os.urandom(16).hex(), os.urandom(8).hex()


def _traceparent(context: tuple[str, str]) -> str:
    return f"00-{context[0]}-{context[1]}-01"


def _with_headers(headers: dict[str, object]) -> aio_pika.Message:
    message = to_amqp_message(score_message())
    message.headers = headers  # type: ignore[assignment]
    return message


def _stores(receiver: OtlpReceiver) -> list[ReceivedSpan]:
    return receiver.received(lambda span: span.name == "store")


async def test_a_direct_publishers_traceparents_are_linked_and_bad_ones_ignored(
    traced: Settings, receiver: OtlpReceiver, db: asyncpg.Connection
) -> None:
    single = _context()
    gathered = [_context() for _ in range(3)]
    messages = [
        _with_headers({TRACEPARENT_HEADER: _traceparent(single)}),
        _with_headers({TRACEPARENTS_HEADER: [_traceparent(each) for each in gathered]}),
        _with_headers({TRACEPARENT_HEADER: "00-not-a-trace-01"}),
        _with_headers({TRACEPARENTS_HEADER: "not an array"}),
        _with_headers({TRACEPARENT_HEADER: 42}),
        to_amqp_message(score_message()),
    ]
    async with connect_broker(traced) as broker, running_worker(traced):
        await broker.publish(messages)
        assert await wait_for_count(db, COUNT_SCORES, len(messages)) == len(messages)
    stores = _stores(receiver)
    assert sum(span.attributes["messaging.batch.message_count"] for span in stores) == 6
    assert sum(span.attributes["score_ingest.scores"] for span in stores) == 6
    links = [link for span in stores for link in span.links]
    assert sorted(links) == sorted([single, *gathered])
    for span in stores:
        assert span.service == "score-ingest-worker"
        assert span.attributes["score_ingest.links_dropped"] == 0


async def test_a_store_span_holds_at_most_max_links_and_counts_the_rest(
    traced: Settings, receiver: OtlpReceiver, db: asyncpg.Connection
) -> None:
    # Two gathered messages of MAX_LINKS contexts each: whether they are stored in one batch
    # or two, every context is a link or counted as dropped, and no span holds more.
    contexts = [[_context() for _ in range(MAX_LINKS)] for _ in range(2)]
    messages = [
        _with_headers({TRACEPARENTS_HEADER: [_traceparent(each) for each in some]})
        for some in contexts
    ]
    async with connect_broker(traced) as broker:
        await broker.publish(messages)
        async with running_worker(traced):
            assert await wait_for_count(db, COUNT_SCORES, 2) == 2
    stores = _stores(receiver)
    assert all(len(span.links) <= MAX_LINKS for span in stores)
    linked = {link for span in stores for link in span.links}
    assert linked <= {each for some in contexts for each in some}
    dropped = sum(span.attributes["score_ingest.links_dropped"] for span in stores)
    assert len(linked) + dropped == 2 * MAX_LINKS
    for span in stores:
        # A batch of many traces is a trace of its own, linked to them.
        assert span.parent_span_id == ""


async def test_a_message_of_one_trace_makes_the_store_span_its_child(
    traced: Settings, receiver: OtlpReceiver, db: asyncpg.Connection
) -> None:
    context = _context()
    async with connect_broker(traced) as broker, running_worker(traced):
        await broker.publish([_with_headers({TRACEPARENT_HEADER: _traceparent(context)})])
        assert await wait_for_count(db, COUNT_SCORES, 1) == 1
    (store,) = _stores(receiver)
    assert (store.trace_id, store.parent_span_id) == context
    assert store.links == [context]
    (insert,) = receiver.received(lambda span: span.name == "insert")
    assert (insert.trace_id, insert.parent_span_id) == (store.trace_id, store.span_id)
