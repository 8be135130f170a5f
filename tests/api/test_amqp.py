"""ConfirmingPublisher (api/amqp.py) against the real broker: frames, confirms, failures.

Every test declares exchanges and queues of its own, uniquely named, in the session's vhost
(with aio-pika, which also reads back what arrived) and deletes them afterwards. Faults of
the link come from proxies between the publisher and the broker: TcpProxy (latency, cut)
and GatedProxy below (holds back whatever the broker sends). The resource alarm needs a
RabbitMQ node of this module's own: the machine's node is shared. The last tests run the
api's ScorePublisher (api/publisher.py) on scores.persist in a vhost of their own, to see
how it treats a connection whose publishes are nacked.
"""

import asyncio
import contextlib
import gc
import logging
import os
import struct
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlsplit

import aio_pika
import psutil
import pytest
import uvloop
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.header import ContentHeader

import api.publisher
from api.amqp import (
    AmqpAddress,
    ConfirmingPublisher,
    MessageProperties,
    PublishFailed,
    UnsupportedBrokerUrl,
    encode_header,
    parse_amqp_url,
)
from api.errors import BrokerUnavailable
from api.publisher import ScorePublisher
from shared.settings import Settings
from shared.topology import QUEUE
from tests.support.processes import CliProcess
from tests.support.rabbitmq_node import RabbitMQNode
from tests.support.services import free_port
from tests.support.tcp_proxy import TcpProxy

PROPERTIES = MessageProperties("application/json", "amqp-test.v1", "amqp-tests")
# Not on a whole second: AMQP timestamps carry seconds only.
STAMP = datetime(2024, 5, 17, 12, 30, 45, 987_654, tzinfo=UTC)
ROUTING_KEY = "rk"
# RabbitMQ's default frame_max, which the publisher accepts in connection.tune; a body frame
# carries frame_max minus 8 bytes of framing.
FRAME_MAX = 131_072
BODY_FRAME_PAYLOAD = FRAME_MAX - 8
# Far above anything a test waits for, so that a failure other than a timeout cannot be one.
LONG_TIMEOUT = 30.0


# Helpers


def unique(what: str) -> str:
    """A name no other test (or run) uses."""
    return f"amqp-test-{what}-{uuid.uuid4().hex[:10]}"


async def reason_of(outcome: Awaitable[None]) -> str | None:
    """None when the publish was confirmed, else the PublishFailed reason."""
    try:
        await outcome
    except PublishFailed as exc:
        return exc.reason
    return None


async def reasons_of(outcomes: Sequence[Awaitable[None]]) -> list[str | None]:
    """reason_of for each, in order, awaited together."""
    return list(await asyncio.gather(*(reason_of(outcome) for outcome in outcomes)))


async def until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    """Poll condition until it holds; fail after timeout seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.01)


def publish(
    publisher: ConfirmingPublisher,
    exchange: str,
    body: bytes = b'{"ok": true}',
    *,
    message_id: str | None = None,
    routing_key: str = ROUTING_KEY,
) -> asyncio.Future[None]:
    """publisher.publish with the test properties and a fresh message id unless given."""
    return publisher.publish(
        exchange,
        routing_key,
        body,
        PROPERTIES,
        message_id=message_id or str(uuid.uuid4()),
        timestamp=STAMP,
    )


@contextlib.asynccontextmanager
async def connected(
    url: str,
    *,
    publish_timeout: float = LONG_TIMEOUT,
    connect_timeout: float = 10.0,
    heartbeat: int = 30,
    kind: type[ConfirmingPublisher] = ConfirmingPublisher,
) -> AsyncIterator[ConfirmingPublisher]:
    """A connected publisher, closed however the test ends."""
    publisher = await kind.connect(
        url,
        connection_name="tests-shared-amqp",
        connect_timeout=connect_timeout,
        publish_timeout=publish_timeout,
        heartbeat=heartbeat,
    )
    try:
        yield publisher
    finally:
        await publisher.close()


class Broker:
    """Declares uniquely named exchanges and queues, reads them back, deletes them all."""

    def __init__(self, channel: AbstractChannel) -> None:
        self.channel = channel
        self._exchanges: list[str] = []
        self._queues: list[str] = []

    async def queue(self, arguments: dict[str, Any] | None = None, *, durable: bool = True) -> str:
        """A queue, reachable through the default exchange by its name."""
        name = unique("q")
        self._queues.append(name)
        await self.channel.declare_queue(name, durable=durable, arguments=arguments)
        return name

    async def exchange(self, *, bound_to: str | None = None) -> str:
        """A direct exchange; with bound_to, that queue is bound to it by ROUTING_KEY."""
        name = unique("x")
        self._exchanges.append(name)
        exchange = await self.channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT)
        if bound_to is not None:
            queue = await self.channel.get_queue(bound_to)
            await queue.bind(exchange, ROUTING_KEY)
        return name

    async def routed(self, *, durable: bool = True) -> tuple[str, str]:
        """An exchange and the queue it routes ROUTING_KEY to."""
        queue = await self.queue(durable=durable)
        return await self.exchange(bound_to=queue), queue

    async def count(self, queue: str) -> int:
        """How many messages the queue holds."""
        declared = await self.channel.declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count

    async def get(self, queue: str) -> AbstractIncomingMessage:
        """The next message of the queue (acknowledged); fails if there is none."""
        found = await (await self.channel.get_queue(queue)).get(no_ack=True, fail=False)
        assert found is not None, f"no message in {queue}"
        return found

    async def delete_all(self) -> None:
        for name in self._queues:
            await self.channel.queue_delete(name, if_unused=False, if_empty=False)
        for name in self._exchanges:
            await self.channel.exchange_delete(name, if_unused=False)


@contextlib.asynccontextmanager
async def broker_at(url: str) -> AsyncIterator[Broker]:
    connection = await aio_pika.connect(url, timeout=10)
    async with connection:
        broker = Broker(await connection.channel())
        try:
            yield broker
        finally:
            await broker.delete_all()


@pytest.fixture
async def broker(amqp_url: str) -> AsyncIterator[Broker]:
    """A Broker in the session's vhost."""
    async with broker_at(amqp_url) as found:
        yield found


class GatedProxy:
    """Forwards 127.0.0.1:<port> to the broker; `hold()` holds back what the broker sends
    (as a stalled link would, the publisher's frames still reach it) until `release()`,
    which lets it through in order. `stop_reading()` stops reading what the publisher sends,
    as a broker that blocks a connection does, until `resume_reading()`: the publisher's
    socket fills up. `sent` keeps every byte the publisher sent that the proxy read."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self._url = url
        self._target = (parts.hostname, parts.port or 5672)
        self._gate = asyncio.Event()
        self._gate.set()
        self._reading = asyncio.Event()
        self._reading.set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.WriteTransport] = set()
        self.sent = bytearray()

    @property
    def url(self) -> str:
        """The broker URL, pointed at this proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._url)
        return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def stop_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        # End every connection (rather than cancel its handler, which asyncio would log).
        for transport in list(self._transports):
            transport.abort()
        self._gate.set()
        self._reading.set()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._transports.add(writer.transport)
        up_writer: asyncio.StreamWriter | None = None
        try:
            with contextlib.suppress(OSError):
                up_reader, up_writer = await asyncio.open_connection(*self._target)
                self._transports.add(up_writer.transport)
                await asyncio.gather(
                    self._pump(reader, up_writer, None, self.sent, self._reading),
                    self._pump(up_reader, writer, self._gate, None),
                )
        finally:
            writer.transport.abort()
            self._transports.discard(writer.transport)
            if up_writer is not None:
                up_writer.transport.abort()
                self._transports.discard(up_writer.transport)
            self._handlers.discard(handler)

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        gate: asyncio.Event | None,
        record: bytearray | None,
        reading: asyncio.Event | None = None,
    ) -> None:
        with contextlib.suppress(OSError):
            while (reading is None or await reading.wait()) and (data := await reader.read(65536)):
                if record is not None:
                    record += data
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        # One direction ended: end the other too, as a real peer would.
        writer.transport.abort()


def split_frames(sent: bytes | bytearray) -> list[tuple[int, int, bytes]]:
    """The (type, channel, payload) of every frame a client sent after the protocol header;
    fails on a malformed frame."""
    assert sent.startswith(b"AMQP\x00\x00\x09\x01")
    frames, start = [], 8
    while start < len(sent):
        kind, channel, size = struct.unpack_from(">BHI", sent, start)
        end = start + 7 + size
        assert sent[end : end + 1] == b"\xce", f"no frame end after frame at {start}"
        frames.append((kind, channel, bytes(sent[start + 7 : end])))
        start = end + 1
    return frames


class FrameProxy:
    """Forwards whole frames between one publisher and the broker.

    `to_publisher(method)` slips a frame in between the broker's, as if the broker had sent
    it. Every frame from the publisher is kept, decoded, in `from_publisher`; those `swallow`
    matches are not passed on (answers to what the broker itself never sent).
    """

    def __init__(self, url: str, swallow: Callable[[frame.FrameTypes], bool]) -> None:
        parts = urlsplit(url)
        assert parts.hostname is not None
        self._url = url
        self._target = (parts.hostname, parts.port or 5672)
        self._swallow = swallow
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self._transports: set[asyncio.WriteTransport] = set()
        self._publisher: asyncio.StreamWriter | None = None
        self.from_publisher: list[frame.FrameTypes] = []

    @property
    def url(self) -> str:
        """The broker URL, pointed at this proxy."""
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(self._url)
        return parts._replace(netloc=f"{parts.username}:{parts.password}@127.0.0.1:{port}").geturl()

    def to_publisher(self, value: frame.FrameTypes, channel: int = 1) -> None:
        """Send the publisher a frame, between two of the broker's."""
        assert self._publisher is not None, "no publisher connected"
        self._publisher.write(frame.marshal(value, channel))

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        for transport in list(self._transports):
            transport.abort()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self._handlers.add(handler)
        self._transports.add(writer.transport)
        self._publisher = writer
        try:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                up_reader, up_writer = await asyncio.open_connection(*self._target)
                self._transports.add(up_writer.transport)
                up_writer.write(await reader.readexactly(8))  # the protocol header
                await asyncio.gather(
                    self._from_publisher(reader, up_writer), self._to_publisher(up_reader, writer)
                )
        finally:
            for transport in list(self._transports):
                transport.abort()
            self._handlers.discard(handler)

    async def _from_publisher(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            raw = await self._read_frame(reader)
            value = frame.unmarshal(raw)[2]
            self.from_publisher.append(value)
            if not self._swallow(value):
                writer.write(raw)

    async def _to_publisher(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            writer.write(await self._read_frame(reader))

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> bytes:
        head = await reader.readexactly(7)
        (size,) = struct.unpack_from(">I", head, 3)
        return head + await reader.readexactly(size + 1)


def header_frame(payload: bytes) -> bytes:
    """A content header frame on channel 1, built by hand from the spec."""
    return struct.pack(">BHI", 2, 1, len(payload)) + payload + b"\xce"


# 1. The content header


@pytest.mark.parametrize(
    ("message_id", "timestamp"),
    [
        (str(uuid.uuid4()), STAMP),
        ("", STAMP),
        ("x" * 255, STAMP),
        # 127 characters, 254 bytes: the limit is on bytes.
        ("é" * 127, STAMP),
        ("id", datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=-7)))),
    ],
    ids=["uuid", "empty", "255-bytes", "multibyte", "other-zone"],
)
def test_encode_header_round_trips_through_pamqp(message_id: str, timestamp: datetime) -> None:
    properties = MessageProperties("application/json; charset=utf-8", "score.create.v1", "ä-app")
    data = header_frame(encode_header(1_234_567, properties, message_id, timestamp))

    consumed, channel, header = frame.unmarshal(data)

    assert (consumed, channel) == (len(data), 1)
    assert isinstance(header, ContentHeader)
    assert header.body_size == 1_234_567
    decoded = header.properties
    assert decoded.content_type == properties.content_type
    assert decoded.message_type == properties.message_type
    assert decoded.app_id == properties.app_id
    assert decoded.message_id == message_id
    assert decoded.delivery_mode == 2
    assert decoded.timestamp is not None
    assert decoded.timestamp == timestamp.replace(microsecond=0)
    # Class basic, weight 0, and exactly these property flags (AMQP 0-9-1, 4.2.6.1):
    # content-type, delivery-mode, message-id, timestamp, type, app-id.
    class_id, weight, _, flags = struct.unpack_from(">HHQH", data, 7)
    assert (class_id, weight) == (60, 0)
    assert flags == 1 << 15 | 1 << 12 | 1 << 7 | 1 << 6 | 1 << 5 | 1 << 3


@pytest.mark.parametrize("message_id", ["x" * 256, "é" * 128], ids=["256-ascii", "128-twobyte"])
def test_encode_header_refuses_a_message_id_over_255_bytes(message_id: str) -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        encode_header(1, PROPERTIES, message_id, STAMP)


def test_encode_header_refuses_an_over_long_property() -> None:
    with pytest.raises(ValueError, match="255 bytes"):
        encode_header(1, MessageProperties("t" * 256, "type", "app"), "id", STAMP)


# 2. Publishing and what arrives


@pytest.mark.parametrize(
    "size",
    [0, 1, BODY_FRAME_PAYLOAD, BODY_FRAME_PAYLOAD + 1, 2 * BODY_FRAME_PAYLOAD, 400 * 1024],
    ids=["empty", "one-byte", "one-full-frame", "frame-plus-one", "two-full-frames", "400KB"],
)
async def test_a_routed_publish_is_confirmed_and_arrives_intact(
    amqp_url: str, broker: Broker, size: int
) -> None:
    exchange, queue = await broker.routed()
    body = os.urandom(size)
    message_id = str(uuid.uuid4())
    async with connected(amqp_url) as publisher:
        outcome = publish(publisher, exchange, body, message_id=message_id)
        assert publisher.unconfirmed == 1
        await asyncio.wait_for(outcome, 10)
        assert publisher.unconfirmed == 0

    message = await broker.get(queue)
    assert len(message.body) == size
    assert message.body == body
    assert message.exchange == exchange
    assert message.routing_key == ROUTING_KEY
    assert message.content_type == PROPERTIES.content_type
    assert message.type == PROPERTIES.message_type
    assert message.app_id == PROPERTIES.app_id
    assert message.message_id == message_id
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp is not None
    assert int(message.timestamp.replace(tzinfo=UTC).timestamp()) == int(STAMP.timestamp())
    assert not message.headers
    assert await broker.count(queue) == 0


async def test_a_large_body_goes_in_body_frames_no_larger_than_frame_max(
    amqp_url: str, broker: Broker
) -> None:
    # RabbitMQ tolerates frames up to 8 bytes over frame_max, so only the bytes on the wire
    # show whether the publisher keeps to the limit it agreed in connection.tune-ok.
    exchange, _ = await broker.routed()
    body = os.urandom(400 * 1024)
    async with GatedProxy(amqp_url) as proxy, connected(proxy.url) as publisher:
        assert await reason_of(publish(publisher, exchange, body)) is None
        frames = split_frames(proxy.sent)
    assert all(len(payload) + 8 <= FRAME_MAX for _, _, payload in frames)
    headers = [payload for kind, channel, payload in frames if (kind, channel) == (2, 1)]
    bodies = [payload for kind, channel, payload in frames if (kind, channel) == (3, 1)]
    assert len(headers) == 1
    assert struct.unpack_from(">Q", headers[0], 4) == (len(body),)
    assert [len(payload) for payload in bodies] == [BODY_FRAME_PAYLOAD] * 3 + [
        len(body) - 3 * BODY_FRAME_PAYLOAD
    ]
    assert b"".join(bodies) == body


async def test_publishes_to_several_exchanges_arrive_in_order(
    amqp_url: str, broker: Broker
) -> None:
    first, first_queue = await broker.routed()
    second, second_queue = await broker.routed()
    async with connected(amqp_url) as publisher:
        outcomes = [
            publish(publisher, (first, second)[n % 2], str(n).encode(), message_id=str(n))
            for n in range(20)
        ]
        assert await reasons_of(outcomes) == [None] * 20
    for queue, parity in ((first_queue, 0), (second_queue, 1)):
        got = [(await broker.get(queue)).message_id for _ in range(10)]
        assert got == [str(n) for n in range(parity, 20, 2)]


class AckSpy(ConfirmingPublisher):
    """Records every confirm the broker sends: (delivery tag, multiple)."""

    def __init__(self, publish_timeout: float, heartbeat: int) -> None:
        super().__init__(publish_timeout, heartbeat)
        self.settled: list[tuple[int, bool]] = []

    def _settle(self, tag: int, multiple: bool, error: PublishFailed | None) -> None:
        self.settled.append((tag, multiple))
        super()._settle(tag, multiple, error)


# 3. Many at once


async def test_3000_concurrent_publishes_are_all_confirmed(amqp_url: str, broker: Broker) -> None:
    exchange, queue = await broker.routed()
    async with connected(amqp_url, kind=AckSpy) as publisher:
        assert isinstance(publisher, AckSpy)
        outcomes = [publish(publisher, exchange, b"%d" % n) for n in range(3000)]
        assert publisher.unconfirmed == 3000
        assert await asyncio.wait_for(reasons_of(outcomes), 20) == [None] * 3000
        assert publisher.unconfirmed == 0
        # The broker acknowledged in bulk at least once: the `multiple` path was taken.
        assert any(multiple for _, multiple in publisher.settled), publisher.settled[:20]
        assert len(publisher.settled) < 3000
        assert publisher.is_open
    assert await broker.count(queue) == 3000


# 4. Unroutable


async def test_an_unroutable_publish_fails_and_its_neighbours_are_confirmed(
    amqp_url: str, broker: Broker
) -> None:
    routed, queue = await broker.routed()
    unbound = await broker.exchange()
    async with connected(amqp_url) as publisher:
        assert await reason_of(publish(publisher, routed)) is None
        assert await reason_of(publish(publisher, unbound)) == "unroutable"
        assert await reason_of(publish(publisher, routed)) is None
        # The default exchange, a routing key naming no queue.
        assert await reason_of(publish(publisher, "", routing_key=unique("none"))) == "unroutable"
        assert publisher.is_open
        assert publisher.unconfirmed == 0
    assert await broker.count(queue) == 2


@pytest.mark.parametrize(
    "durable",
    # A durable queue confirms persistent messages once on disk, well after the broker
    # returned and confirmed the unroutable ones; a transient queue confirms at once, so
    # its confirms and those of returned messages come mixed in `multiple` acks.
    [True, False],
    ids=["durable-queue", "transient-queue"],
)
async def test_interleaved_routable_and_unroutable_publishes_each_get_their_own_outcome(
    amqp_url: str, broker: Broker, durable: bool
) -> None:
    routed, queue = await broker.routed(durable=durable)
    unbound = await broker.exchange()
    # Irregular, so that an outcome shifted by one or more publishes shows.
    pattern = [n % 3 == 0 or n % 7 == 0 for n in range(300)]  # True: unroutable
    async with connected(amqp_url) as publisher:
        outcomes = [
            publish(publisher, unbound if unroutable else routed, b"%d" % n, message_id=str(n))
            for n, unroutable in enumerate(pattern)
        ]
        # A large unroutable one too: its returned body spans several frames.
        big = publish(publisher, unbound, os.urandom(400 * 1024))
        after = publish(publisher, routed, b"after")
        reasons = await asyncio.wait_for(reasons_of([*outcomes, big, after]), 10)
        expected = ["unroutable" if unroutable else None for unroutable in pattern]
        assert reasons == [*expected, "unroutable", None]
        assert publisher.unconfirmed == 0
        assert publisher.is_open
    routed_count = pattern.count(False)
    assert await broker.count(queue) == routed_count + 1
    got = [(await broker.get(queue)).message_id for _ in range(routed_count)]
    assert got == [str(n) for n, unroutable in enumerate(pattern) if not unroutable]


# 5. Refused (nack)


@pytest.mark.parametrize(
    ("queue_type", "overshoot"),
    # A quorum queue applies its limit after an enqueue: the publish that takes it over the
    # limit is kept (and confirmed), every later one is refused.
    [("classic", 0), ("quorum", 1)],
)
async def test_a_publish_over_a_reject_publish_limit_is_refused(
    amqp_url: str, broker: Broker, queue_type: str, overshoot: int
) -> None:
    queue = await broker.queue(
        {"x-queue-type": queue_type, "x-max-length": 1, "x-overflow": "reject-publish"}
    )
    async with connected(amqp_url) as publisher:
        sequential = [await reason_of(publish(publisher, "", routing_key=queue)) for _ in range(4)]
        assert sequential == [None] * (1 + overshoot) + ["refused"] * (3 - overshoot)
        # Concurrent ones, all over the limit: nacks (perhaps `multiple`) fail each of them.
        concurrent = [publish(publisher, "", routing_key=queue) for _ in range(50)]
        assert await reasons_of(concurrent) == ["refused"] * 50
        assert publisher.unconfirmed == 0
        assert publisher.is_open
    assert await broker.count(queue) == 1 + overshoot


async def test_refused_and_confirmed_publishes_interleaved_each_get_their_own_outcome(
    amqp_url: str, broker: Broker
) -> None:
    routed, queue = await broker.routed()
    full = await broker.queue({"x-max-length": 1, "x-overflow": "reject-publish"})
    async with connected(amqp_url) as publisher:
        assert await reason_of(publish(publisher, "", routing_key=full)) is None
        outcomes = [
            publish(publisher, "", routing_key=full) if n % 2 else publish(publisher, routed)
            for n in range(100)
        ]
        assert await reasons_of(outcomes) == [None, "refused"] * 50
    assert await broker.count(queue) == 50


# 6. Timeout


async def test_a_publish_not_confirmed_in_time_fails_as_timeout(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    async with (
        TcpProxy.for_url(amqp_url, latency=0.5) as proxy,
        connected(proxy.url_through(amqp_url), publish_timeout=0.2) as publisher,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        outcome = publish(publisher, exchange)
        reason = await asyncio.wait_for(reason_of(outcome), 5)
        elapsed = loop.time() - started
        assert reason == "timeout"
        assert 0.15 < elapsed < 1.5
        # The late confirm is absorbed, and the connection stays up.
        await until(lambda: publisher.unconfirmed == 0, "the late confirm")
        assert publisher.is_open
    # The broker had the message all along: a timeout is no proof it was lost.
    assert await broker.count(queue) == 1


# 7. Losing the connection


async def test_a_cut_connection_fails_in_flight_publishes_and_refuses_new_ones(
    amqp_url: str, broker: Broker
) -> None:
    exchange, _ = await broker.routed()
    # With latency, the confirms are still on their way when the link is cut.
    async with (
        TcpProxy.for_url(amqp_url, latency=0.3) as proxy,
        connected(proxy.url_through(amqp_url)) as publisher,
    ):
        loop = asyncio.get_running_loop()
        outcomes = [publish(publisher, exchange) for _ in range(50)]
        await asyncio.sleep(0.05)
        started = loop.time()
        await proxy.cut()
        assert await asyncio.wait_for(reasons_of(outcomes), 5) == ["unavailable"] * 50
        await asyncio.wait_for(publisher.closed, 1)
        assert loop.time() - started < 1.0
        assert not publisher.is_open
        assert publisher.unconfirmed == 0
        with pytest.raises(PublishFailed) as refused:
            publish(publisher, exchange)
        assert refused.value.reason == "unavailable"


async def test_an_idle_connection_cut_resolves_closed(amqp_url: str) -> None:
    async with (
        TcpProxy.for_url(amqp_url) as proxy,
        connected(proxy.url_through(amqp_url)) as publisher,
    ):
        assert publisher.is_open
        assert not publisher.closed.done()
        await proxy.cut()
        await asyncio.wait_for(publisher.closed, 2)
        assert not publisher.is_open


async def test_a_silent_broker_is_detected_by_heartbeats(amqp_url: str, broker: Broker) -> None:
    exchange, _ = await broker.routed()
    async with (
        GatedProxy(amqp_url) as proxy,
        connected(proxy.url, heartbeat=1) as publisher,
    ):
        loop = asyncio.get_running_loop()
        # Idle but alive: the broker's heartbeats keep the connection up.
        await asyncio.sleep(2.5)
        assert publisher.is_open
        proxy.hold()
        started = loop.time()
        outcome = publish(publisher, exchange)
        await asyncio.wait_for(publisher.closed, 5)
        silent_for = loop.time() - started
        assert await reason_of(outcome) == "unavailable"
        assert not publisher.is_open
        # Two heartbeat intervals of silence, checked every half interval.
        assert 1.0 < silent_for < 4.0


# 8. The broker closes the channel


async def test_the_broker_closing_the_channel_fails_in_flight_publishes(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    async with connected(amqp_url) as publisher:
        before = [publish(publisher, exchange) for _ in range(20)]
        missing = publish(publisher, unique("no-such-exchange"))
        after = [publish(publisher, exchange) for _ in range(20)]
        reasons = await asyncio.wait_for(reasons_of([*before, missing, *after]), 5)
        await asyncio.wait_for(publisher.closed, 2)
        assert not publisher.is_open
        assert publisher.unconfirmed == 0
        with pytest.raises(PublishFailed) as refused:
            publish(publisher, exchange)
        assert refused.value.reason == "unavailable"
    assert set(reasons[:20]) <= {None, "unavailable"}, reasons
    assert reasons[20:] == ["unavailable"] * 21, reasons
    confirmed = reasons[:20].count(None)
    # Nothing published after the bad publish reached the queue.
    assert confirmed <= await broker.count(queue) <= 20


# 9. Failing to connect


def with_wrong_password(url: str) -> str:
    parts = urlsplit(url)
    return parts._replace(netloc=f"guest:wrong-password@{parts.hostname}:{parts.port}").geturl()


def with_unknown_vhost(amqp_url: str) -> str:
    return urlsplit(amqp_url)._replace(path="/" + unique("vhost")).geturl()


@pytest.mark.parametrize(
    ("spoil", "refusal"),
    [(with_wrong_password, "ACCESS_REFUSED"), (with_unknown_vhost, "NOT_ALLOWED")],
    ids=["wrong-password", "unknown-vhost"],
)
async def test_a_refused_login_fails_to_connect_at_once_and_says_why(
    amqp_url: str, spoil: Callable[[str], str], refusal: str
) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(PublishFailed, match=refusal) as failed:
        await asyncio.wait_for(
            ConfirmingPublisher.connect(
                spoil(amqp_url), connection_name="t", connect_timeout=8, publish_timeout=1
            ),
            10,
        )
    # With the `authentication_failure_close` capability, RabbitMQ says why at once instead
    # of dropping the socket after about 3 s.
    assert failed.value.reason == "closed"
    assert loop.time() - started < 2


async def test_nothing_listening_fails_to_connect_with_connection_refused() -> None:
    port = free_port()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(
            ConfirmingPublisher.connect(
                f"amqp://guest:guest@127.0.0.1:{port}/",
                connection_name="t",
                connect_timeout=5,
                publish_timeout=1,
            ),
            10,
        )


async def test_a_peer_that_never_answers_times_out_within_connect_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(
                ConfirmingPublisher.connect(
                    f"amqp://guest:guest@127.0.0.1:{port}/",
                    connection_name="t",
                    connect_timeout=0.5,
                    publish_timeout=1,
                ),
                10,
            )
        assert loop.time() - started < 2
    finally:
        for writer in accepted:
            writer.transport.abort()
        server.close()
        await server.wait_closed()


# 10. Closing


def _open_fds() -> int:
    return psutil.Process().num_fds()


async def test_close_is_clean_and_leaks_nothing(amqp_url: str, broker: Broker) -> None:
    exchange, _ = await broker.routed()
    # Earlier tests' garbage is collected first, so that only ours can show up below.
    gc.collect()
    await asyncio.sleep(0.1)
    tasks_before = asyncio.all_tasks()
    fds_before = _open_fds()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            publisher = await ConfirmingPublisher.connect(
                amqp_url, connection_name="t", connect_timeout=10, publish_timeout=5
            )
            assert await reason_of(publish(publisher, exchange)) is None
            await asyncio.wait_for(publisher.close(), 3)
            assert publisher.closed.done()
            assert not publisher.is_open
            with pytest.raises(PublishFailed) as refused:
                publish(publisher, exchange)
            assert refused.value.reason == "unavailable"
            await publisher.close()  # twice is harmless
            del publisher
        await asyncio.sleep(0.1)
        gc.collect()
    assert asyncio.all_tasks() <= tasks_before
    assert _open_fds() <= fds_before
    leaks = [
        w
        for w in caught
        if issubclass(w.category, ResourceWarning | RuntimeWarning)
        and ("amqp" in w.filename or "transport" in str(w.message).lower())
    ]
    assert not leaks, [str(w.message) for w in leaks]


async def test_close_settles_publishes_in_flight(amqp_url: str, broker: Broker) -> None:
    exchange, _ = await broker.routed()
    async with TcpProxy.for_url(amqp_url, latency=0.2) as proxy:
        publisher = await ConfirmingPublisher.connect(
            proxy.url_through(amqp_url), connection_name="t", connect_timeout=10, publish_timeout=5
        )
        outcomes = [publish(publisher, exchange) for _ in range(20)]
        await asyncio.wait_for(publisher.close(), 3)
        reasons = await asyncio.wait_for(reasons_of(outcomes), 1)
        # Confirmed before the broker's close-ok, or failed: never left hanging.
        assert set(reasons) <= {None, "unavailable"}, reasons
        assert publisher.closed.done()
        assert publisher.unconfirmed == 0


def test_publishing_works_on_uvloop(amqp_url: str) -> None:
    """The api runs on uvloop, whose transports are not asyncio's."""

    async def scenario() -> None:
        async with broker_at(amqp_url) as broker:
            exchange, queue = await broker.routed()
            unbound = await broker.exchange()
            body = os.urandom(300 * 1024)
            async with connected(amqp_url) as publisher:
                outcomes = [publish(publisher, exchange, body), publish(publisher, unbound)]
                outcomes += [publish(publisher, exchange) for _ in range(500)]
                reasons = await asyncio.wait_for(reasons_of(outcomes), 10)
                assert reasons == [None, "unroutable", *[None] * 500]
            assert publisher.closed.done()
            assert (await broker.get(queue)).body == body

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# 11. Blocked by a resource alarm (on the tests' own node, `own_node`)


async def test_a_memory_alarm_fails_in_flight_publishes_and_refuses_new_ones_until_it_clears(
    own_node: RabbitMQNode,
) -> None:
    async with broker_at(own_node.amqp_url) as broker, connected(own_node.amqp_url) as publisher:
        exchange, queue = await broker.routed()
        loop = asyncio.get_running_loop()
        try:
            assert await reason_of(publish(publisher, exchange)) is None
            await own_node.raise_memory_alarm()
            # RabbitMQ blocks a connection when it next publishes (it sends no notice before):
            # these publishes are in flight when connection.blocked arrives, and must fail at
            # once, not time out.
            assert not publisher.blocked, "connection.blocked came before any publish"
            started = loop.time()
            in_flight = [publish(publisher, exchange) for _ in range(10)]
            assert await asyncio.wait_for(reasons_of(in_flight), 5) == ["blocked"] * 10
            assert loop.time() - started < 2
            assert publisher.blocked
            assert publisher.is_open
            with pytest.raises(PublishFailed) as refused:
                publish(publisher, exchange)
            assert refused.value.reason == "blocked"
        finally:
            if own_node.memory_alarm:
                await own_node.clear_memory_alarm()
        await until(lambda: not publisher.blocked, "connection.unblocked", timeout=10)
        assert await asyncio.wait_for(reason_of(publish(publisher, exchange)), 5) is None
        # The publishes failed as blocked reached the queue once the alarm cleared: a
        # failure is no proof that a message was lost.
        await until(lambda: publisher.unconfirmed == 0, "their late confirms")
        assert await broker.count(queue) == 12


# 12. Flow control: TCP back-pressure and channel.flow


async def test_a_broker_that_stops_reading_pauses_writing_and_an_overdue_publish_is_never_sent(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    # Large: the transport then holds megabytes past the socket's buffers when it pauses,
    # far more than the kernel can free by compacting them, so the pause lasts.
    body = os.urandom(8 * 1024 * 1024)
    async with (
        GatedProxy(amqp_url) as proxy,
        connected(proxy.url, publish_timeout=0.5) as publisher,
    ):
        proxy.stop_reading()
        # Publish until the socket and the transport's buffer are full and it says so.
        early: dict[str, asyncio.Future[None]] = {}
        while not publisher.paused:
            assert len(early) < 10, "80 MiB written and the transport never paused"
            message_id = f"early-{len(early)}"
            early[message_id] = publish(publisher, exchange, body, message_id=message_id)
            await asyncio.sleep(0)  # the flush
        late = [publish(publisher, exchange, b"late", message_id=f"late-{n}") for n in range(20)]
        # They wait, and fail once their timeout has passed: answered 503 by the api.
        assert await asyncio.wait_for(reasons_of(late), 5) == ["timeout"] * 20
        assert publisher.paused
        proxy.resume_reading()
        await until(lambda: not publisher.paused, "resume_writing", timeout=10)
        await until(lambda: publisher.unconfirmed == 0, "the early ones' confirms", timeout=20)
        assert set(await reasons_of(list(early.values()))) <= {None, "timeout"}
        # Delivery tags stayed in step with the broker's count: a later publish is confirmed.
        assert await asyncio.wait_for(reason_of(publish(publisher, exchange)), 5) is None
        assert publisher.is_open
    # Everything written arrived, nothing that had failed before it was written.
    arrived = [(await broker.get(queue)).message_id for _ in range(len(early) + 1)]
    assert arrived[:-1] == list(early)
    assert await broker.count(queue) == 0


def swallow_flow_ok(value: frame.FrameTypes) -> bool:
    """The publisher's answers to the proxy's channel.flow: the broker never asked."""
    return isinstance(value, commands.Channel.FlowOk)


def flow_oks(frames: list[frame.FrameTypes]) -> list[bool | None]:
    """The `active` of each channel.flow-ok the publisher sent."""
    return [value.active for value in frames if isinstance(value, commands.Channel.FlowOk)]


def published_after(frames: list[frame.FrameTypes], marker: type[Frame]) -> int:
    """How many basic.publish frames the publisher sent after its last `marker` frame."""
    last = max(n for n, value in enumerate(frames) if isinstance(value, marker))
    return sum(isinstance(value, commands.Basic.Publish) for value in frames[last:])


async def test_channel_flow_holds_publishes_back_until_the_broker_resumes(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    async with (
        FrameProxy(amqp_url, swallow_flow_ok) as proxy,
        connected(proxy.url) as publisher,
    ):
        assert await reason_of(publish(publisher, exchange, message_id="before")) is None
        proxy.to_publisher(commands.Channel.Flow(active=False))
        await until(lambda: publisher.paused, "channel.flow active=false")
        held = [publish(publisher, exchange, message_id=f"held-{n}") for n in range(10)]
        await until(lambda: flow_oks(proxy.from_publisher) == [False], "flow-ok")
        await asyncio.sleep(0.3)
        assert not any(outcome.done() for outcome in held)
        assert published_after(proxy.from_publisher, commands.Channel.FlowOk) == 0
        assert publisher.unconfirmed == 10

        proxy.to_publisher(commands.Channel.Flow(active=True))
        assert await asyncio.wait_for(reasons_of(held), 5) == [None] * 10
        assert not publisher.paused
        assert flow_oks(proxy.from_publisher) == [False, True]
    arrived = [(await broker.get(queue)).message_id for _ in range(11)]
    assert arrived == ["before", *(f"held-{n}" for n in range(10))]


async def test_a_publish_that_times_out_while_the_broker_stopped_the_flow_is_never_sent(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    async with (
        FrameProxy(amqp_url, swallow_flow_ok) as proxy,
        connected(proxy.url, publish_timeout=0.3) as publisher,
    ):
        proxy.to_publisher(commands.Channel.Flow(active=False))
        await until(lambda: publisher.paused, "channel.flow active=false")
        overdue = [publish(publisher, exchange, message_id=f"overdue-{n}") for n in range(5)]
        assert await asyncio.wait_for(reasons_of(overdue), 5) == ["timeout"] * 5
        assert publisher.unconfirmed == 0
        proxy.to_publisher(commands.Channel.Flow(active=True))
        await until(lambda: not publisher.paused, "channel.flow active=true")
        assert await reason_of(publish(publisher, exchange, message_id="after")) is None
        assert published_after(proxy.from_publisher, commands.Confirm.Select) == 1
    assert (await broker.get(queue)).message_id == "after"
    assert await broker.count(queue) == 0


# 13. The URL


@pytest.mark.parametrize(
    ("url", "address"),
    [
        (
            "amqp://guest:guest@127.0.0.1:5672/",
            AmqpAddress("127.0.0.1", 5672, "guest", "guest", "/", False, None),
        ),
        ("amqp://rabbit", AmqpAddress("rabbit", 5672, "guest", "guest", "/", False, None)),
        (
            "amqps://api:p%40ss%2Fw@rabbit.internal/%2F?heartbeat=10",
            AmqpAddress("rabbit.internal", 5671, "api", "p@ss/w", "/", True, 10),
        ),
        (
            "amqps://u:p@rabbit:15671/scores?heartbeat=0",
            AmqpAddress("rabbit", 15671, "u", "p", "scores", True, 0),
        ),
    ],
    ids=["local", "defaults", "amqps-default-port", "amqps-vhost-no-heartbeat"],
)
def test_an_amqp_url_is_read_as_the_rabbitmq_uri_spec_says(url: str, address: AmqpAddress) -> None:
    assert parse_amqp_url(url) == address


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("amqp://h/?connection_timeout=5000", "connection_timeout: the connect timeout is"),
        ("amqp://h/?timeout=5", "timeout: the connect timeout is PUBLISH_TIMEOUT_SECONDS"),
        ("amqps://h/?cafile=/etc/ca.pem", "cafile: set AMQP_CA_FILE instead"),
        ("amqps://h/?certfile=c&keyfile=k", "certfile: set AMQP_CERT_FILE instead; keyfile"),
        ("amqps://h/?no_verify_ssl=1", "no_verify_ssl: the broker's certificate is always"),
        ("amqp://h/?frame_max=4096", "frame_max: not implemented"),
        ("amqp://h/?heartbeat=soon", "heartbeat='soon': seconds, a whole number"),
        ("amqp://h/?heartbeat=70000", "heartbeat='70000'"),
        ("http://h/", "must start with amqp:// or amqps://, not http://"),
        ("amqp://h:port/", "invalid port"),
    ],
)
def test_an_amqp_url_option_the_publisher_does_not_implement_is_refused(
    url: str, refusal: str
) -> None:
    with pytest.raises(UnsupportedBrokerUrl) as refused:
        parse_amqp_url(url)
    assert refusal in str(refused.value)


async def test_the_heartbeat_option_sets_the_heartbeat_asked_for(amqp_url: str) -> None:
    with_option = urlsplit(amqp_url)._replace(query="heartbeat=7")
    async with FrameProxy(amqp_url, lambda _: False) as proxy:
        async with connected(with_option._replace(netloc=urlsplit(proxy.url).netloc).geturl()):
            pass
        (tune_ok,) = [v for v in proxy.from_publisher if isinstance(v, commands.Connection.TuneOk)]
    assert tune_ok.heartbeat == 7


async def test_the_api_refuses_to_start_with_an_option_it_does_not_implement(
    settings: Settings,
) -> None:
    url = urlsplit(settings.amqp_url)._replace(query="connection_timeout=5000").geturl()
    api = CliProcess(
        "api", ["api", "--port", str(free_port())], settings.model_copy(update={"amqp_url": url})
    )
    async with api:
        assert await api.wait(20) != 0
    assert "does not support these AMQP_URL options (connection_timeout" in api.output


# Regressions: each of these was a bug the tests above missed


async def test_a_publish_refused_for_an_over_long_message_id_does_not_harm_the_connection(
    amqp_url: str, broker: Broker
) -> None:
    exchange, queue = await broker.routed()
    async with connected(amqp_url) as publisher:
        with pytest.raises(ValueError, match="255 bytes"):
            publish(publisher, exchange, message_id="x" * 256)
        assert publisher.unconfirmed == 0
        assert await asyncio.wait_for(reason_of(publish(publisher, exchange)), 5) is None
        assert publisher.is_open
    assert await broker.count(queue) == 1


async def test_a_late_return_does_not_fail_a_later_publish_with_the_same_message_id(
    amqp_url: str, broker: Broker
) -> None:
    routed, queue = await broker.routed()
    unbound = await broker.exchange()
    async with (
        GatedProxy(amqp_url) as proxy,
        connected(proxy.url, publish_timeout=0.3) as publisher,
    ):
        proxy.hold()
        lost = publish(publisher, unbound, message_id="same-id")
        assert await reason_of(lost) == "timeout"
        proxy.release()
        await until(lambda: publisher.unconfirmed == 0, "the late return and confirm")
        retried = publish(publisher, routed, message_id="same-id")
        assert await reason_of(retried) is None
    assert await broker.count(queue) == 1


async def test_close_completes_when_the_broker_answers_close_ok(amqp_url: str) -> None:
    publisher = await ConfirmingPublisher.connect(
        amqp_url, connection_name="t", connect_timeout=10, publish_timeout=5
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    await publisher.close()
    assert publisher.closed.done()
    # One round trip to a local broker; close() gives up on the broker after 1 s.
    assert loop.time() - started < 0.5


async def test_publishes_sharing_a_message_id_each_get_their_own_outcome(
    amqp_url: str, broker: Broker
) -> None:
    # A transient queue confirms at once, so that one `multiple` ack often covers a routed
    # publish and the returned one after it.
    routed, queue = await broker.routed(durable=False)
    unbound = await broker.exchange()
    async with connected(amqp_url) as publisher:
        outcomes = []
        for n in range(300):
            outcomes.append(publish(publisher, routed, message_id=f"shared-{n}"))
            outcomes.append(publish(publisher, unbound, message_id=f"shared-{n}"))
        reasons = await asyncio.wait_for(reasons_of(outcomes), 10)
    wrong = [n for n in range(300) if reasons[2 * n : 2 * n + 2] != [None, "unroutable"]]
    assert not wrong, (
        f"{len(wrong)} of 300 (routed, unroutable) pairs got other outcomes, e.g. "
        f"{reasons[2 * wrong[0] : 2 * wrong[0] + 2]}"
    )
    assert await broker.count(queue) == 300


async def test_a_connection_start_sent_before_the_client_asks_is_not_lost() -> None:
    """The broker's connection.start can be read before the handshake waits for it (it
    was, now and then, under load, and the first connect then hung until its timeout)."""
    publisher = ConfirmingPublisher(publish_timeout=1, heartbeat=0)
    start = commands.Connection.Start(mechanisms="PLAIN", locales="en_US")
    publisher.data_received(frame.marshal(start, 0))  # read before anyone waits for it

    received = await asyncio.wait_for(publisher._expect(commands.Connection.Start), 2)

    assert isinstance(received, commands.Connection.Start)


# 13. The api's ScorePublisher on a connection whose publishes are nacked

# In place of STUCK_SECONDS (3 s), so that a storm would show within a short run.
STUCK_SECONDS_HERE = 0.5
NACKING_SECONDS = 2.6
DRAIN_EVERY_SECONDS = 0.1


async def publish_score(publisher: ScorePublisher) -> str | None:
    """Publish one score's fields; None when confirmed, else the PublishFailed reason."""
    try:
        await publisher.publish_scores([{"score_id": str(uuid.uuid4()), "value": 1}])
    except BrokerUnavailable as exc:
        cause = exc.__cause__
        return cause.reason if isinstance(cause, PublishFailed) else repr(cause)
    return None


@contextlib.asynccontextmanager
async def publisher_on_a_full_queue(
    settings: Settings, url: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[ScorePublisher]:
    """A connected ScorePublisher whose scores.persist, at url, is full: publishes are nacked."""
    monkeypatch.setattr(api.publisher, "STUCK_SECONDS", STUCK_SECONDS_HERE)
    publisher = ScorePublisher(settings.model_copy(update={"amqp_url": url, "queue_max_length": 1}))
    publisher.start()
    try:
        await asyncio.wait_for(publisher.wait_ready(), 10)
        # A quorum queue keeps the publish that takes it over its limit.
        assert [await publish_score(publisher) for _ in range(3)] == [None, None, "refused"]
        yield publisher
    finally:
        await publisher.close()


async def publish_for(publisher: ScorePublisher, seconds: float) -> Counter[str | None]:
    """Publish scores one after the other for that long; how many got each outcome."""
    loop = asyncio.get_running_loop()
    outcomes: Counter[str | None] = Counter()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        outcomes[await publish_score(publisher)] += 1
        await asyncio.sleep(0.005)
    return outcomes


def replacements(caplog: pytest.LogCaptureFixture) -> int:
    """How many times the publisher left a node as stuck."""
    return sum(
        record.getMessage().startswith("publisher leaves broker node") for record in caplog.records
    )


async def test_a_score_publisher_nacked_throughout_reconnects_once_per_stuck_period_not_per_nack(
    settings: Settings,
    bare_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="api.publisher")
    async with publisher_on_a_full_queue(settings, bare_vhost, monkeypatch) as publisher:
        outcomes = await publish_for(publisher, NACKING_SECONDS)
        await asyncio.wait_for(publisher.wait_ready(), 10)
    # Refused by the broker, or at once while the connection is being replaced.
    assert set(outcomes) <= {"refused", "unavailable"}, outcomes
    assert outcomes["refused"] > 10 * NACKING_SECONDS / STUCK_SECONDS_HERE, outcomes
    # A connection that gets only nacks is replaced (that cures a channel stuck by a
    # partition), but each new one is given STUCK_SECONDS: a full queue is no reconnect storm.
    assert 1 <= replacements(caplog) <= NACKING_SECONDS / STUCK_SECONDS_HERE + 1


async def test_a_score_publisher_whose_nacks_come_between_confirms_keeps_its_connection(
    settings: Settings,
    bare_vhost: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="api.publisher")
    connection = await aio_pika.connect(bare_vhost, timeout=10)
    async with (
        connection,
        publisher_on_a_full_queue(settings, bare_vhost, monkeypatch) as publisher,
    ):
        queue = await (await connection.channel()).get_queue(QUEUE)

        async def drain_slowly() -> None:
            while True:
                await queue.get(no_ack=True, fail=False)
                await asyncio.sleep(DRAIN_EVERY_SECONDS)

        draining = asyncio.create_task(drain_slowly())
        try:
            outcomes = await publish_for(publisher, NACKING_SECONDS)
        finally:
            draining.cancel()
    # Each message taken off makes room for one: most publishes are nacked, but some are
    # confirmed more often than every STUCK_SECONDS, so the connection is not stuck.
    assert outcomes["refused"] > outcomes[None] > NACKING_SECONDS / STUCK_SECONDS_HERE, outcomes
    assert set(outcomes) == {None, "refused"}, outcomes
    assert replacements(caplog) == 0
