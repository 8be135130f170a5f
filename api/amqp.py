"""A lean confirming AMQP 0-9-1 publisher: one connection, one channel in confirm mode.

aio-pika and aiormq cost about 0.3 ms of CPU per published message on our 2-core machines
(a `Message` object, property marshalling, a channel lock, a task and a socket write per
publish); the benchmark (BENCHMARKS.md) found that to be a third of an api request. This
client does only what the api needs, per the AMQP 0-9-1 spec and RabbitMQ's publisher
confirms extension:

- a publish marshals its three (or more) frames by hand and queues them; what is queued is
  written once per event-loop iteration, however many requests published in it;
- the queue is written only while the connection may take more: TCP back-pressure (the
  transport's `pause_writing`) and the broker's `channel.flow` hold it back. A publish still
  queued when its timeout expires fails and is dropped, never sent later;
- confirms are matched by delivery tag, `multiple` acks and nacks included; a tag is given
  when a message is written, so dropping a queued one keeps the count in step with the broker;
- a mandatory message the broker cannot route comes back as `basic.return` (before its
  ack), and fails as unroutable;
- `connection.blocked` (a resource alarm) fails every unconfirmed publish at once, and
  refuses new ones until `connection.unblocked`;
- a publish not confirmed within its timeout fails; heartbeats detect a dead peer;
- any loss of the connection or the channel fails every unconfirmed publish and resolves
  `closed`, so the owner can reconnect;
- `amqps://` URLs connect with TLS; an URL option this client does not implement is refused
  (`parse_amqp_url`) rather than ignored.

A failed publish that was written may still have reached the queue: the broker decides, not
us. That is why a failure is answered 503 and never 200, and why storing a score twice is a
no-op.

The bench and the tests' hostile publisher reuse it (`publish_raw` sends a content header
given as bytes), so that there is one AMQP handshake in the code base besides aio-pika's.
"""

import asyncio
import contextlib
import ssl
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast
from urllib.parse import parse_qsl, unquote, urlsplit

from pamqp import commands, encode, frame
from pamqp.base import Frame
from pamqp.exceptions import UnmarshalingException
from pamqp.header import ContentHeader, ProtocolHeader

from shared.broker import broker_nodes

_CHANNEL: Final = 1
_FRAME_METHOD, _FRAME_HEADER, _FRAME_BODY, _FRAME_HEARTBEAT = 1, 2, 3, 8
_FRAME_END: Final = b"\xce"
_FRAME_OVERHEAD: Final = 8  # type (1), channel (2), size (4) ... frame end (1)
_BASIC_CLASS: Final = 60
_SWEEP_SECONDS: Final = 0.05
_HEARTBEAT: Final = struct.pack(">BHI", _FRAME_HEARTBEAT, 0, 0) + _FRAME_END
# Bytes handed to the transport at a time: it says `pause_writing` only after a write, so
# this bounds how far past its limit one flush can go (a message is never cut).
_WRITE_CHUNK: Final = 256 * 1024
_MAX_HEARTBEAT: Final = 65535  # a short in connection.tune-ok

# Property flags of the content header, in the order their values are encoded.
_CONTENT_TYPE, _HEADERS, _DELIVERY_MODE, _MESSAGE_ID, _TIMESTAMP, _TYPE, _APP_ID = (
    1 << 15,
    1 << 13,
    1 << 12,
    1 << 7,
    1 << 6,
    1 << 5,
    1 << 3,
)

# URL options other clients read, and what to do instead. Anything else is refused too.
_OPTION_ADVICE: Final = {
    "cafile": "set AMQP_CA_FILE instead",
    "capath": "set AMQP_CA_FILE (one file of CA certificates) instead",
    "cadata": "set AMQP_CA_FILE instead",
    "certfile": "set AMQP_CERT_FILE instead",
    "keyfile": "set AMQP_KEY_FILE instead",
    "cacertfile": "set AMQP_CA_FILE instead",
    "no_verify_ssl": "the broker's certificate is always verified",
    "verify": "the broker's certificate is always verified",
    "timeout": "the connect timeout is PUBLISH_TIMEOUT_SECONDS",
    "connection_timeout": "the connect timeout is PUBLISH_TIMEOUT_SECONDS",
}


class PublishFailed(Exception):
    """The broker did not confirm a publish; `reason` says why, as a metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class UnsupportedBrokerUrl(ValueError):
    """The AMQP URL asks for something this client does not do."""


@dataclass(frozen=True, slots=True)
class AmqpAddress:
    """Where and as whom to connect, as an AMQP URL gives it."""

    host: str
    port: int
    user: str
    password: str
    vhost: str
    tls: bool
    heartbeat: int | None  # ?heartbeat=<seconds>; None: the caller's default


def parse_amqp_url(url: str) -> AmqpAddress:
    """Read an `amqp://` or `amqps://` URL of one node; raises UnsupportedBrokerUrl for
    anything else, and for any query option but `heartbeat` (seconds between heartbeats,
    0: none). Hosts and ports are read by shared.broker.broker_nodes, for every client."""
    try:
        nodes = broker_nodes(url)
    except ValueError as exc:
        raise UnsupportedBrokerUrl(str(exc)) from None
    if len(nodes) > 1:
        raise UnsupportedBrokerUrl(
            "the publisher connects to one node at a time: give it one of shared.broker."
            "broker_nodes(AMQP_URL)"
        )
    parts = urlsplit(nodes[0])
    # broker_nodes wrote both.
    assert parts.hostname is not None
    assert parts.port is not None
    heartbeat = None
    refused = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "heartbeat" and value.isdigit() and int(value) <= _MAX_HEARTBEAT:
            heartbeat = int(value)
        elif name == "heartbeat":
            refused.append(f"heartbeat={value!r}: seconds, a whole number from 0 to 65535")
        else:
            refused.append(f"{name}: {_OPTION_ADVICE.get(name, 'not implemented')}")
    if refused:
        raise UnsupportedBrokerUrl(
            "the api's AMQP publisher does not support these AMQP_URL options ("
            + "; ".join(refused)
            + "); the only option it reads is heartbeat=<seconds>"
        )
    return AmqpAddress(
        host=parts.hostname,
        port=parts.port,
        user=unquote(parts.username or "guest"),
        password=unquote(parts.password or "guest"),
        vhost=unquote(parts.path[1:]) or "/",
        tls=parts.scheme == "amqps",
        heartbeat=heartbeat,
    )


@dataclass(frozen=True, slots=True)
class MessageProperties:
    """The properties every message of ours carries; all messages are persistent."""

    content_type: str
    message_type: str
    app_id: str


@dataclass(slots=True)
class _Pending:
    outcome: asyncio.Future[None]
    message_id: str
    route: tuple[str, str]  # exchange, routing key
    deadline: float
    frames: list[bytes]  # emptied once written
    size: int


def _shortstr(value: str) -> bytes:
    encoded = value.encode()
    if len(encoded) > 255:
        raise ValueError(f"AMQP short strings hold at most 255 bytes: {value[:40]!r}…")
    return bytes((len(encoded),)) + encoded


def encode_header(
    body_size: int,
    properties: MessageProperties,
    message_id: str,
    timestamp: datetime,
    headers: dict[str, Any] | None = None,
) -> bytes:
    """The payload of a content header frame: class, weight, body size, flags, properties
    (and headers, a field table, when given: the trace context of the message's requests)."""
    flags = _CONTENT_TYPE | _DELIVERY_MODE | _MESSAGE_ID | _TIMESTAMP | _TYPE | _APP_ID
    table = b""
    if headers:
        flags |= _HEADERS
        table = encode.field_table(headers)
    return b"".join(
        (
            struct.pack(">HHQH", _BASIC_CLASS, 0, body_size, flags),
            _shortstr(properties.content_type),
            table,
            b"\x02",  # delivery mode 2: persistent
            _shortstr(message_id),
            struct.pack(">Q", int(timestamp.timestamp())),
            _shortstr(properties.message_type),
            _shortstr(properties.app_id),
        )
    )


def _frame(kind: int, payload: bytes) -> bytes:
    return struct.pack(">BHI", kind, _CHANNEL, len(payload)) + payload + _FRAME_END


class ConfirmingPublisher(asyncio.Protocol):
    """A connection to RabbitMQ whose one channel publishes with confirms.

    Make one with `connect()`. `publish()` never blocks: it returns a future that completes
    when the broker confirms the message, or fails with PublishFailed.
    """

    def __init__(self, publish_timeout: float, heartbeat: int) -> None:
        self._loop = asyncio.get_running_loop()
        self._publish_timeout = publish_timeout
        self._heartbeat = heartbeat
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._unsent: deque[_Pending] = deque()
        self._flush_scheduled = False
        self._writing_paused = False  # by the transport: its buffer is full
        self._flow_stopped = False  # by the broker: channel.flow active=false
        # Handshake replies, kept until asked for: the broker's connection.start can arrive
        # before the handshake starts waiting for it.
        self._replies: asyncio.Queue[Frame | PublishFailed] = asyncio.Queue()
        self._open = False
        self._blocked = False
        self._frame_max = 131_072
        self._publish_frames: dict[tuple[str, str], bytes] = {}
        self._next_tag = 1
        self._lowest_pending = 1
        self._swept_through = 0
        self._pending: dict[int, _Pending] = {}  # written, by delivery tag
        self._returned: set[int] = set()  # delivery tags of publishes the broker returned
        self._returning: tuple[str, str] | None = None  # route of a returned message
        self._last_received = self._loop.time()
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self.closed: asyncio.Future[None] = self._loop.create_future()

    # Connecting

    @classmethod
    async def connect(
        cls,
        url: str,
        *,
        connection_name: str,
        connect_timeout: float,
        publish_timeout: float,
        heartbeat: int = 30,
        tls: ssl.SSLContext | None = None,
    ) -> "ConfirmingPublisher":
        """Connect, log in, open a channel and turn on confirms.

        An `amqps://` URL connects with TLS: with `tls` if given, else trusting the system's
        CAs. Raises UnsupportedBrokerUrl for a URL it cannot follow, OSError or PublishFailed
        (reason "closed") when the broker cannot be reached, is not trusted or refuses.
        """
        address = parse_amqp_url(url)
        if tls is not None and not address.tls:
            raise UnsupportedBrokerUrl("a TLS context was given for an amqp:// URL: use amqps://")
        if address.tls and tls is None:
            tls = ssl.create_default_context()
        loop = asyncio.get_running_loop()
        publisher = cls(
            publish_timeout, heartbeat if address.heartbeat is None else address.heartbeat
        )
        try:
            async with asyncio.timeout(connect_timeout):
                await loop.create_connection(lambda: publisher, address.host, address.port, ssl=tls)
                await publisher._handshake(
                    address.user, address.password, address.vhost, connection_name
                )
        except ssl.SSLCertVerificationError as exc:
            publisher.abort()
            raise PublishFailed(
                "closed",
                f"the TLS certificate of the broker at {address.host}:{address.port} is not "
                f"trusted ({exc.verify_message}): AMQP_CA_FILE must hold the CA that signed it",
            ) from exc
        except BaseException:
            publisher.abort()
            raise
        return publisher

    async def _handshake(self, user: str, password: str, vhost: str, name: str) -> None:
        await self._expect(commands.Connection.Start)
        self._send(
            0,
            commands.Connection.StartOk(
                client_properties={
                    "connection_name": name,
                    "product": "score-ingest",
                    "capabilities": {
                        "publisher_confirms": True,
                        "connection.blocked": True,
                        "basic.nack": True,
                        "authentication_failure_close": True,
                    },
                },
                response=f"\0{user}\0{password}",
            ),
        )
        tune = await self._expect(commands.Connection.Tune)
        assert isinstance(tune, commands.Connection.Tune)
        heartbeat = min(tune.heartbeat, self._heartbeat) if tune.heartbeat else self._heartbeat
        self._frame_max = tune.frame_max or self._frame_max
        self._send(0, commands.Connection.TuneOk(tune.channel_max, self._frame_max, heartbeat))
        self._send(0, commands.Connection.Open(virtual_host=vhost))
        await self._expect(commands.Connection.OpenOk)
        self._send(_CHANNEL, commands.Channel.Open())
        await self._expect(commands.Channel.OpenOk)
        self._send(_CHANNEL, commands.Confirm.Select())
        await self._expect(commands.Confirm.SelectOk)
        self._open = True
        self._every(_SWEEP_SECONDS, self._fail_overdue)
        if heartbeat:
            self._every(heartbeat / 2, self._beat, heartbeat)

    async def _expect(self, kind: type[Frame]) -> Frame:
        received = await self._replies.get()
        if isinstance(received, PublishFailed):
            raise received
        if not isinstance(received, kind):
            raise PublishFailed("closed", f"expected {kind.__name__}, got {received.name}")
        return received

    # State

    @property
    def is_open(self) -> bool:
        """Whether the connection and its channel are open."""
        return self._open

    @property
    def blocked(self) -> bool:
        """Whether the broker has blocked publishing (a memory or disk alarm)."""
        return self._blocked

    @property
    def paused(self) -> bool:
        """Whether publishes wait to be written: the socket is full or the broker said
        `channel.flow` active=false."""
        return self._writing_paused or self._flow_stopped

    @property
    def unconfirmed(self) -> int:
        """How many publishes still wait for their confirm (written or not)."""
        return len(self._pending) + len(self._unsent)

    @property
    def waiting_seconds(self) -> float:
        """How long the oldest publish the broker has not settled yet has waited (0 if none),
        its own timeout passed or not."""
        oldest = self._pending.get(self._lowest_pending) or next(iter(self._unsent), None)
        if oldest is None:
            return 0.0
        return self._loop.time() - (oldest.deadline - self._publish_timeout)

    # Publishing

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: MessageProperties,
        *,
        message_id: str,
        timestamp: datetime,
        headers: dict[str, Any] | None = None,
    ) -> asyncio.Future[None]:
        """Send a persistent, mandatory message; the future completes on its confirm."""
        header = encode_header(len(body), properties, message_id, timestamp, headers)
        return self.publish_raw(exchange, routing_key, header, body, message_id=message_id)

    def publish_raw(
        self, exchange: str, routing_key: str, header: bytes, body: bytes, *, message_id: str
    ) -> asyncio.Future[None]:
        """`publish`, with the content header's payload given as bytes, sent as they are
        (class, weight, body size, flags and properties: a test's hostile header, say);
        message_id is the one it carries, to match a return."""
        if not self._open:
            raise PublishFailed("unavailable", "not connected to the message broker")
        if self._blocked:
            raise PublishFailed("blocked", "message broker is blocking publishers (resource alarm)")
        method = self._publish_frames.get((exchange, routing_key))
        if method is None:
            publish = commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=True
            )
            method = self._publish_frames[(exchange, routing_key)] = frame.marshal(
                publish, _CHANNEL
            )
        frames = [method, _frame(_FRAME_HEADER, header)]
        chunk = self._frame_max - _FRAME_OVERHEAD
        for start in range(0, len(body), chunk):
            frames.append(_frame(_FRAME_BODY, body[start : start + chunk]))
        outcome = self._loop.create_future()
        deadline = self._loop.time() + self._publish_timeout
        size = len(method) + len(header) + len(body) + _FRAME_OVERHEAD * (len(frames) - 1)
        self._unsent.append(
            _Pending(outcome, message_id, (exchange, routing_key), deadline, frames, size)
        )
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        return outcome

    def _flush(self) -> None:
        """Write queued publishes while the transport and the broker take more."""
        self._flush_scheduled = False
        transport = self._transport
        while self._unsent and not self.paused:
            if transport is None or transport.is_closing():
                return
            out: list[bytes] = []
            size = 0
            while self._unsent and size < _WRITE_CHUNK:
                pending = self._unsent.popleft()
                if pending.outcome.done():  # cancelled by its owner: never sent
                    continue
                out.extend(pending.frames)
                size += pending.size
                pending.frames = []
                # The broker numbers the messages it receives on the channel from 1.
                self._pending[self._next_tag] = pending
                self._next_tag += 1
            if out:
                transport.write(b"".join(out))  # may call pause_writing

    def _schedule_flush(self) -> None:
        if self._unsent and not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _send(self, channel: int, value: Frame) -> None:
        assert self._transport is not None
        self._transport.write(frame.marshal(value, channel))

    # Flow control

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._schedule_flush()

    # Receiving

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(ProtocolHeader().marshal())

    def data_received(self, data: bytes) -> None:
        self._last_received = self._loop.time()
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= _FRAME_OVERHEAD:
            kind, _, size = struct.unpack_from(">BHI", buffer, start)
            end = start + 7 + size + 1
            if len(buffer) < end:
                break
            raw = bytes(buffer[start:end])
            start = end
            try:
                self._receive(kind, raw)
            except (UnmarshalingException, ValueError, struct.error) as exc:
                self._lose(f"could not read a frame from the broker: {exc}")
                return
        del buffer[:start]

    def _receive(self, kind: int, raw: bytes) -> None:
        """Act on one whole frame, as read (header, payload, frame end)."""
        if kind == _FRAME_METHOD:
            _, _, method = frame.unmarshal(raw)
            assert isinstance(method, Frame)
            self._on_method(method)
        elif kind == _FRAME_HEADER and self._returning is not None:
            # The header of a returned message: its id tells which publish came back.
            _, _, header = frame.unmarshal(raw)
            assert isinstance(header, ContentHeader)
            self._mark_returned(header.properties.message_id or "", self._returning)
            self._returning = None
        # Bodies of returned messages and heartbeats need nothing more.

    def _on_method(self, method: Frame) -> None:
        if isinstance(method, commands.Basic.Ack):
            self._settle(method.delivery_tag, method.multiple, None)
        elif isinstance(method, commands.Basic.Nack):
            self._settle(
                method.delivery_tag,
                method.multiple,
                PublishFailed(
                    "refused", "message broker refused the message (queue full or unavailable)"
                ),
            )
        elif isinstance(method, commands.Basic.Return):
            self._returning = (method.exchange, method.routing_key or "")
        elif isinstance(method, commands.Channel.Flow):
            # The broker asks us to stop (or resume) sending content on the channel.
            self._flow_stopped = not method.active
            self._write_quietly(commands.Channel.FlowOk(active=method.active), _CHANNEL)
            self._schedule_flush()
        elif isinstance(method, commands.Connection.Blocked):
            self._blocked = True
            self._fail_all(
                PublishFailed("blocked", "message broker is blocking publishers (resource alarm)")
            )
        elif isinstance(method, commands.Connection.Unblocked):
            self._blocked = False
        elif isinstance(method, commands.Connection.CloseOk):
            self._lose("closed")
        elif isinstance(method, commands.Connection.Close):
            self._write_quietly(commands.Connection.CloseOk(), 0)
            self._lose(f"the broker closed the connection: {method.reply_text}")
        elif isinstance(method, commands.Channel.Close):
            self._write_quietly(commands.Channel.CloseOk(), _CHANNEL)
            self._lose(f"the broker closed the channel: {method.reply_text}")
        elif not self._open:
            self._replies.put_nowait(method)

    def _mark_returned(self, message_id: str, route: tuple[str, str]) -> None:
        # The broker handles a channel's publishes in order and returns an unroutable one
        # before its ack: the return is for the oldest publish not yet acked or returned
        # with this id and route (two such publishes would share their fate anyway).
        for tag, pending in self._pending.items():
            if (
                pending.message_id == message_id
                and pending.route == route
                and tag not in self._returned
            ):
                self._returned.add(tag)
                return

    def _settle(self, tag: int, multiple: bool, error: PublishFailed | None) -> None:
        tags = range(self._lowest_pending, tag + 1) if multiple else (tag,)
        for each in tags:
            pending = self._pending.pop(each, None)
            returned = each in self._returned
            self._returned.discard(each)
            if pending is None or pending.outcome.done():
                continue
            if returned:
                pending.outcome.set_exception(
                    PublishFailed("unroutable", "message broker could not route the message")
                )
            elif error is None:
                pending.outcome.set_result(None)
            else:
                pending.outcome.set_exception(error)
        while self._lowest_pending < self._next_tag and self._lowest_pending not in self._pending:
            self._lowest_pending += 1

    # Timers

    def _every(self, seconds: float, action: Callable[..., None], *args: object) -> None:
        name = action.__name__

        def tick() -> None:
            action(*args)
            if self._open:
                self._timers[name] = self._loop.call_later(seconds, tick)

        self._timers[name] = self._loop.call_later(seconds, tick)

    def _fail_overdue(self) -> None:
        now = self._loop.time()
        # Not written yet: dropped, so that a publish answered with a failure is never sent.
        unsent = self._unsent
        while unsent and (unsent[0].deadline <= now or unsent[0].outcome.done()):
            overdue = unsent.popleft()
            if not overdue.outcome.done():
                overdue.outcome.set_exception(
                    PublishFailed("timeout", "message broker took no more messages in time")
                )
        # Written: they stay until the broker settles them, which absorbs a late confirm.
        tag = max(self._swept_through + 1, self._lowest_pending)
        while tag < self._next_tag:
            pending = self._pending.get(tag)
            if pending is not None:
                if pending.deadline > now:
                    break
                if not pending.outcome.done():
                    pending.outcome.set_exception(
                        PublishFailed("timeout", "message broker did not confirm in time")
                    )
            tag += 1
        self._swept_through = tag - 1

    def _beat(self, heartbeat: int) -> None:
        if self._loop.time() - self._last_received > 2 * heartbeat:
            self._lose("no heartbeat from the broker")
        elif self._transport is not None:
            self._transport.write(_HEARTBEAT)

    # Ending

    def _write_quietly(self, value: Frame, channel: int) -> None:
        with contextlib.suppress(Exception):
            self._send(channel, value)

    def _fail_all(self, error: PublishFailed) -> None:
        """Fail every unconfirmed publish; those not written yet are dropped."""
        for pending in (*self._pending.values(), *self._unsent):
            if not pending.outcome.done():
                pending.outcome.set_exception(error)
        self._unsent.clear()

    def _lose(self, detail: str) -> None:
        self._open = False
        self._fail_all(PublishFailed("unavailable", f"lost the message broker: {detail}"))
        self._pending.clear()
        self._returned.clear()
        self._replies.put_nowait(PublishFailed("closed", detail))
        for timer in self._timers.values():
            timer.cancel()
        if self._transport is not None:
            self._transport.close()
        if not self.closed.done():
            self.closed.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._lose(f"connection lost ({exc or 'closed'})")

    def abort(self) -> None:
        """Drop the connection at once; unconfirmed publishes fail."""
        self._lose("closed by us")
        if self._transport is not None:
            self._transport.abort()

    async def close(self) -> None:
        """Close the connection politely, after writing what the connection takes;
        unconfirmed publishes fail."""
        if self._open and self._transport is not None:
            self._open = False
            self._flush()
            self._write_quietly(
                commands.Connection.Close(
                    reply_code=200, reply_text="bye", class_id=0, method_id=0
                ),
                0,
            )
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.closed), 1)
        self.abort()
