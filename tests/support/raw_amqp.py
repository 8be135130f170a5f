"""Publishing messages byte for byte, as a careless or hostile publisher can.

Client libraries refuse to encode what the broker accepts anyway: a header table nested
thousands of levels deep, keys and strings that are not UTF-8, odd property values. Here
a content header is built as raw bytes and published, with confirms, by the api's own
publisher (`ConfirmingPublisher.publish_raw` sends it as given), so tests can put such
messages on a queue the way the real world does.
"""

import asyncio
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from api.amqp import ConfirmingPublisher, PublishFailed

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
    message_id: str = ""  # as a returned copy's would read, to tell which publish came back

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
    readable_id = "" if message_id is None else message_id.decode(errors="replace")
    return RawMessage(body, flags, b"".join(parts), readable_id)


async def publish_raw(
    url: str, exchange: str, routing_key: str, messages: Sequence[RawMessage]
) -> None:
    """Publish each message (mandatory, confirmed, in order); fail unless the broker acks all."""
    async with asyncio.timeout(_TIMEOUT_SECONDS):
        publisher = await ConfirmingPublisher.connect(
            url,
            connection_name="tests-raw-amqp",
            connect_timeout=_TIMEOUT_SECONDS,
            publish_timeout=_TIMEOUT_SECONDS,
        )
        try:
            outcomes = [
                publisher.publish_raw(
                    exchange,
                    routing_key,
                    message.header_payload(),
                    message.body,
                    message_id=message.message_id,
                )
                for message in messages
            ]
            results = await asyncio.gather(*outcomes, return_exceptions=True)
            refused = [
                f"message {index}: {result.reason}: {result}"
                for index, result in enumerate(results)
                if isinstance(result, PublishFailed)
            ]
            if refused:
                raise AssertionError(f"the broker did not accept {'; '.join(refused)}")
        finally:
            await publisher.close()
