"""Publishing messages byte for byte, as a careless or hostile publisher can.

Client libraries refuse to encode what the broker accepts anyway: a header table nested
thousands of levels deep, keys and strings that are not UTF-8, odd property values. This
writer speaks just enough AMQP 0-9-1 (pamqp for the method frames) to publish a content
header given as raw bytes, with publisher confirms, so tests can put such messages on a
queue the way the real world does.
"""

import asyncio
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote, urlsplit

from pamqp import commands, frame
from pamqp.base import Frame
from pamqp.header import ProtocolHeader

_CHANNEL: Final = 1
_FRAME_HEADER, _FRAME_BODY = 2, 3
_FRAME_END: Final = b"\xce"
_BASIC_CLASS: Final = 60
_TIMEOUT_SECONDS: Final = 10.0

# Property flags of a basic content header, in the order their values follow the flags.
CONTENT_TYPE: Final = 1 << 15
HEADERS: Final = 1 << 13
DELIVERY_MODE: Final = 1 << 12
MESSAGE_ID: Final = 1 << 7
TIMESTAMP: Final = 1 << 6
TYPE: Final = 1 << 5


def short_string(raw: bytes) -> bytes:
    """An AMQP short string of exactly these bytes (UTF-8 or not)."""
    assert len(raw) <= 255
    return bytes((len(raw),)) + raw


def long_string(raw: bytes) -> bytes:
    """A field value of type `S` holding exactly these bytes."""
    return b"S" + struct.pack(">I", len(raw)) + raw


def field_table(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A field table from (raw key, encoded field value) pairs."""
    content = b"".join(short_string(key) + value for key, value in fields)
    return struct.pack(">I", len(content)) + content


def nested_table(depth: int, leaf: bytes = long_string(b"bottom")) -> bytes:
    """The encoded value (`F` + table) of a table holding a table ... depth levels deep."""
    value = leaf
    for _ in range(depth):
        value = b"F" + field_table([(b"n", value)])
    return value


@dataclass(frozen=True)
class RawMessage:
    """A message as it goes on the wire: the property part of its content header, raw."""

    body: bytes
    flags: int
    properties: bytes  # the property values, encoded, in flag order

    def header_payload(self) -> bytes:
        """The content header frame's payload: class, weight, body size, flags, values."""
        return struct.pack(">HHQH", _BASIC_CLASS, 0, len(self.body), self.flags) + self.properties


def raw_message(
    body: bytes,
    *,
    content_type: bytes | None = b"application/json",
    headers: bytes | None = None,
    delivery_mode: int | None = 2,
    message_id: bytes | None = None,
    timestamp: int | None = None,
    message_type: bytes | None = None,
) -> RawMessage:
    """A message whose properties are given as the bytes to send (headers: an encoded table)."""
    flags = 0
    parts: list[bytes] = []
    if content_type is not None:
        flags |= CONTENT_TYPE
        parts.append(short_string(content_type))
    if headers is not None:
        flags |= HEADERS
        parts.append(headers)
    if delivery_mode is not None:
        flags |= DELIVERY_MODE
        parts.append(bytes((delivery_mode,)))
    if message_id is not None:
        flags |= MESSAGE_ID
        parts.append(short_string(message_id))
    if timestamp is not None:
        flags |= TIMESTAMP
        parts.append(struct.pack(">Q", timestamp))
    if message_type is not None:
        flags |= TYPE
        parts.append(short_string(message_type))
    return RawMessage(body, flags, b"".join(parts))


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self.frame_max = 131_072

    async def receive(self) -> frame.FrameTypes:
        header = await self._reader.readexactly(7)
        _, _, size = struct.unpack(">BHI", header)
        rest = await self._reader.readexactly(size + 1)
        return frame.unmarshal(header + rest)[2]

    async def expect(self, kind: type[Frame]) -> Frame:
        received = await self.receive()
        if not isinstance(received, kind):
            raise AssertionError(f"expected {kind.__name__}, the broker sent {received!r}")
        return received

    def send(self, channel: int, value: frame.FrameTypes) -> None:
        self._writer.write(frame.marshal(value, channel))

    def send_raw(self, kind: int, payload: bytes) -> None:
        self._writer.write(struct.pack(">BHI", kind, _CHANNEL, len(payload)) + payload + _FRAME_END)

    async def drain(self) -> None:
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        await self._writer.wait_closed()


async def _open(url: str) -> _Connection:
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(
        parts.hostname or "localhost", parts.port or 5672
    )
    connection = _Connection(reader, writer)
    connection.send(0, ProtocolHeader())
    await connection.expect(commands.Connection.Start)
    user, password = unquote(parts.username or "guest"), unquote(parts.password or "guest")
    connection.send(0, commands.Connection.StartOk(response=f"\0{user}\0{password}"))
    tune = await connection.expect(commands.Connection.Tune)
    assert isinstance(tune, commands.Connection.Tune)
    connection.frame_max = tune.frame_max or connection.frame_max
    connection.send(0, commands.Connection.TuneOk(tune.channel_max, connection.frame_max, 0))
    connection.send(0, commands.Connection.Open(virtual_host=unquote(parts.path[1:]) or "/"))
    await connection.expect(commands.Connection.OpenOk)
    connection.send(_CHANNEL, commands.Channel.Open())
    await connection.expect(commands.Channel.OpenOk)
    connection.send(_CHANNEL, commands.Confirm.Select())
    await connection.expect(commands.Confirm.SelectOk)
    return connection


async def publish_raw(
    url: str, exchange: str, routing_key: str, messages: Sequence[RawMessage]
) -> None:
    """Publish each message (mandatory, confirmed, in order); fail unless the broker acks all."""
    async with asyncio.timeout(_TIMEOUT_SECONDS):
        connection = await _open(url)
        try:
            publish = commands.Basic.Publish(
                exchange=exchange, routing_key=routing_key, mandatory=True
            )
            chunk = connection.frame_max - 8
            for message in messages:
                connection.send(_CHANNEL, publish)
                connection.send_raw(_FRAME_HEADER, message.header_payload())
                for start in range(0, len(message.body), chunk):
                    connection.send_raw(_FRAME_BODY, message.body[start : start + chunk])
                await connection.drain()
            confirmed = 0
            while confirmed < len(messages):
                received = await connection.receive()
                if isinstance(received, commands.Basic.Ack):
                    confirmed = received.delivery_tag if received.multiple else confirmed + 1
                else:
                    detail = getattr(received, "reply_text", "")
                    raise AssertionError(
                        f"the broker did not accept a message: {received!r} {detail}"
                    )
            connection.send(0, commands.Connection.Close(200, "done", 0, 0))
            await connection.expect(commands.Connection.CloseOk)
        finally:
            await connection.close()
