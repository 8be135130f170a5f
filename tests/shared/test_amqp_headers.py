"""String headers on the lean publisher (api/amqp.py): the field table it writes, and what
RabbitMQ delivers.

The header frame is decoded by pamqp, an independent implementation of AMQP 0-9-1, and the
published messages are read back with aio-pika from a queue of this module's own in the
session's vhost.
"""

import asyncio
import contextlib
import struct
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp import frame
from pamqp.header import ContentHeader

from api.amqp import ConfirmingPublisher, MessageProperties, encode_header

PROPERTIES = MessageProperties("application/json", "score.create.v1", "score-ingest")
STAMP = datetime(2024, 5, 17, 12, 30, 45, tzinfo=UTC)
# content-type, delivery-mode, message-id, timestamp, type, app-id (AMQP 0-9-1, 4.2.6.1)
BASE_FLAGS = 1 << 15 | 1 << 12 | 1 << 7 | 1 << 6 | 1 << 5 | 1 << 3
HEADERS_FLAG = 1 << 13
# A header of the kind a publisher sets: an id and a hex digest.
DIGEST_HEADER = "x-digest"
DIGEST = "key_0123456789abcdef." + "5e" * 32


def header_frame(payload: bytes) -> bytes:
    """A content header frame on channel 1, built by hand from the spec."""
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


def decode(payload: bytes) -> ContentHeader:
    data = header_frame(payload)
    consumed, channel, header = frame.unmarshal(data)
    assert (consumed, channel) == (len(data), 1)
    assert isinstance(header, ContentHeader)
    return header


def flags_of(payload: bytes) -> int:
    class_id, weight, _, flags = struct.unpack_from(">HHQH", payload)
    assert (class_id, weight) == (60, 0)
    return int(flags)


# The content header


@pytest.mark.parametrize(
    "headers",
    [
        {DIGEST_HEADER: DIGEST},
        {DIGEST_HEADER: DIGEST, "x-other": "second", "x-third": "3"},
        {"x-empty": ""},
        {"x-unicode": "h\u00e9llo \u2713 \U0001f389 \u65e5\u672c"},
        {"x-long": "v" * 70_000},
        {"x-multibyte-long": "\u00e9" * 300},
        {"n" * 255: "name of 255 bytes"},
        {"\u00e9" * 127: "name of 254 bytes"},
        {"x-nul-and-newline": "a\x00b\nc"},
    ],
    ids=[
        "digest",
        "three",
        "empty-value",
        "unicode-value",
        "long-value",
        "multibyte-long-value",
        "255-byte-name",
        "multibyte-name",
        "control-characters",
    ],
)
def test_encode_header_with_headers_round_trips_through_pamqp(headers: dict[str, str]) -> None:
    payload = encode_header(987_654, PROPERTIES, "message-1", STAMP, headers)

    header = decode(payload)

    decoded = header.properties
    assert decoded.headers == headers
    assert list(decoded.headers) == list(headers)  # in the order given
    # Every other property is where it was: the table sits between content-type and
    # delivery-mode, so a wrong length would shift everything after it.
    assert header.body_size == 987_654
    assert decoded.content_type == PROPERTIES.content_type
    assert decoded.delivery_mode == 2
    assert decoded.message_id == "message-1"
    assert decoded.timestamp == STAMP
    assert decoded.message_type == PROPERTIES.message_type
    assert decoded.app_id == PROPERTIES.app_id
    assert flags_of(payload) == BASE_FLAGS | HEADERS_FLAG


@pytest.mark.parametrize("headers", [None, {}], ids=["none", "empty"])
def test_without_headers_the_flag_is_clear_and_the_header_unchanged(
    headers: dict[str, str] | None,
) -> None:
    payload = encode_header(10, PROPERTIES, "message-1", STAMP, headers)

    assert flags_of(payload) == BASE_FLAGS
    assert payload == encode_header(10, PROPERTIES, "message-1", STAMP)
    decoded = decode(payload).properties
    assert decoded.headers is None
    assert decoded.message_id == "message-1"


def test_the_table_is_a_long_string_field_per_header() -> None:
    # Checked byte for byte against the spec (4.2.5.5 field tables, `S` long string), which
    # RabbitMQ and every client read, rather than against one client's decoder only.
    payload = encode_header(0, PROPERTIES, "m", STAMP, {"ab": "\u00e9t\u00e9"})
    table_at = 14 + 1 + len(PROPERTIES.content_type)  # after class..flags and content-type
    value = "\u00e9t\u00e9".encode()
    field = b"\x02ab" + b"S" + struct.pack(">I", len(value)) + value
    assert payload[table_at : table_at + 4 + len(field)] == struct.pack(">I", len(field)) + field
    assert payload[table_at + 4 + len(field)] == 2  # then delivery mode


def test_a_header_name_over_255_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        encode_header(1, PROPERTIES, "id", STAMP, {"n" * 256: "v"})
    with pytest.raises(ValueError, match="255 bytes"):
        encode_header(1, PROPERTIES, "id", STAMP, {"\u00e9" * 128: "v"})


# Publishing to RabbitMQ


@contextlib.asynccontextmanager
async def own_queue(amqp_url: str) -> AsyncIterator[tuple[AbstractChannel, str]]:
    """A durable queue of this test's own, reachable through the default exchange."""
    name = f"amqp-headers-test-{uuid.uuid4().hex[:10]}"
    connection = await aio_pika.connect(amqp_url, timeout=10)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True)
        try:
            yield channel, name
        finally:
            await channel.queue_delete(name, if_unused=False, if_empty=False)


async def take(
    channel: AbstractChannel, queue_name: str, count: int
) -> list[AbstractIncomingMessage]:
    queue = await channel.get_queue(queue_name, ensure=False)
    taken: list[AbstractIncomingMessage] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while len(taken) < count and loop.time() < deadline:
        message = await queue.get(no_ack=True, fail=False)
        if message is None:
            await asyncio.sleep(0.02)
        else:
            taken.append(message)
    assert len(taken) == count, f"{len(taken)} of {count} messages arrived"
    assert await queue.get(no_ack=True, fail=False) is None, "more messages than published"
    return taken


@contextlib.asynccontextmanager
async def publisher_at(amqp_url: str) -> AsyncIterator[ConfirmingPublisher]:
    publisher = await ConfirmingPublisher.connect(
        amqp_url, connection_name="tests-amqp-headers", connect_timeout=10, publish_timeout=10
    )
    try:
        yield publisher
    finally:
        await publisher.close()


async def test_a_published_message_arrives_with_its_headers(amqp_url: str) -> None:
    headers = {DIGEST_HEADER: DIGEST, "x-unicode": "\u00e9 \U0001f389", "x-long": "v" * 5000}
    body = b'{"ok": true}'
    async with own_queue(amqp_url) as (channel, queue), publisher_at(amqp_url) as publisher:
        outcome = publisher.publish(
            "", queue, body, PROPERTIES, message_id="with-headers", timestamp=STAMP, headers=headers
        )
        await asyncio.wait_for(outcome, 10)
        assert publisher.is_open
        (message,) = await take(channel, queue, 1)

    assert message.headers == headers
    assert message.body == body
    assert message.message_id == "with-headers"
    assert message.content_type == PROPERTIES.content_type
    assert message.type == PROPERTIES.message_type
    assert message.app_id == PROPERTIES.app_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp == STAMP


async def test_messages_with_and_without_headers_interleaved_each_arrive_as_sent(
    amqp_url: str,
) -> None:
    """Many messages in one write, some with headers and some without,
    each with a header of its own, bodies spanning several frames among them."""
    count = 60
    sent: list[tuple[bytes, dict[str, str] | None]] = []
    for n in range(count):
        body = (b"%d:" % n) * (50_000 if n % 10 == 3 else 1)
        headers = None if n % 4 == 0 else {DIGEST_HEADER: f"key-{n}.{'ab' * n}"}
        sent.append((body, headers))
    async with own_queue(amqp_url) as (channel, queue), publisher_at(amqp_url) as publisher:
        outcomes = [
            publisher.publish(
                "", queue, body, PROPERTIES, message_id=str(n), timestamp=STAMP, headers=headers
            )
            for n, (body, headers) in enumerate(sent)
        ]
        await asyncio.wait_for(asyncio.gather(*outcomes), 20)
        arrived = await take(channel, queue, count)

    assert [message.message_id for message in arrived] == [str(n) for n in range(count)]
    for message, (body, headers) in zip(arrived, sent, strict=True):
        assert message.body == body, message.message_id
        assert (message.headers or None) == headers, message.message_id
        assert message.type == PROPERTIES.message_type
